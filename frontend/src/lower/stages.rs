//! Splitting a Dockerfile into its global ARG scope and stages, and the stage graph.

use std::collections::BTreeSet;

use crate::instructions::{Instruction, Located};

/// What a stage starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Base {
    Scratch,
    /// An earlier stage, by index.
    Stage(usize),
    /// A `--build-context` of that name.
    Context(String),
    /// An image reference, as written (after expansion).
    Image(String),
}

/// One stage before lowering.
#[derive(Clone, Debug)]
pub struct Stage {
    pub index: usize,
    /// `AS name`, as written.
    pub name: Option<String>,
    pub from: Located,
    /// Instructions after FROM (ONBUILD triggers are prepended once known).
    pub body: Vec<Located>,
    /// How many leading `body` entries are ONBUILD triggers.
    pub triggers: usize,
    pub base: Base,
    /// `FROM --platform`, expanded.
    pub platform: Option<kiln_dag::Platform>,
    /// Stages this one reads (base stage, `--from`, mount `from`).
    pub deps: BTreeSet<usize>,
    /// The stage is replaced by the named context of its own name.
    pub replaced: bool,
    /// Global ARGs its FROM line uses (for the outline).
    pub from_args: BTreeSet<String>,
}

impl Stage {
    /// A copy of everything but the instructions (`body` left empty).
    pub fn clone_without_body(&self) -> Stage {
        Stage {
            index: self.index,
            name: self.name.clone(),
            from: self.from.clone(),
            body: Vec::new(),
            triggers: self.triggers,
            base: self.base.clone(),
            platform: self.platform.clone(),
            deps: self.deps.clone(),
            replaced: self.replaced,
            from_args: self.from_args.clone(),
        }
    }

    /// The name used in progress output and `--no-cache-filter`: the stage name or `stage-N`.
    pub fn display_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("stage-{}", self.index))
    }
}

/// A stage's FROM and the instructions after it.
pub type RawStage = (Located, Vec<Located>);

/// Splits instructions into the global ARGs and the stages. `Err` is the offending instruction.
pub fn split(instructions: Vec<Located>) -> Result<(Vec<Located>, Vec<RawStage>), Box<Located>> {
    let mut globals = Vec::new();
    let mut stages: Vec<RawStage> = Vec::new();
    for ins in instructions {
        match (&ins.instruction, stages.last_mut()) {
            (Instruction::From { .. }, _) => stages.push((ins, Vec::new())),
            (_, Some((_, body))) => body.push(ins),
            (Instruction::Arg(_), None) => globals.push(ins),
            (_, None) => return Err(Box::new(ins)),
        }
    }
    Ok((globals, stages))
}

/// Finds a dependency cycle; returns a stage on it.
pub fn find_cycle(stages: &[Stage]) -> Option<usize> {
    // 0 = unvisited, 1 = on the stack, 2 = done. Iterative DFS.
    let mut state = vec![0u8; stages.len()];
    for start in 0..stages.len() {
        if state[start] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, Vec<usize>)> = vec![(start, stages[start].deps.iter().copied().collect())];
        state[start] = 1;
        while let Some((node, pending)) = stack.last_mut() {
            let node = *node;
            match pending.pop() {
                Some(next) if next < stages.len() => match state[next] {
                    0 => {
                        state[next] = 1;
                        stack.push((next, stages[next].deps.iter().copied().collect()));
                    }
                    1 => return Some(next),
                    _ => {}
                },
                Some(_) => {}
                None => {
                    state[node] = 2;
                    stack.pop();
                }
            }
        }
    }
    None
}

/// The stages reachable from `target`, in index order.
pub fn reachable(stages: &[Stage], target: usize) -> BTreeSet<usize> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![target];
    while let Some(s) = todo.pop() {
        if s >= stages.len() || !seen.insert(s) {
            continue;
        }
        todo.extend(stages[s].deps.iter().copied());
    }
    seen
}
