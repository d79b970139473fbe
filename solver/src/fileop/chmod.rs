//! `--chmod`: octal bits, or a symbolic expression (`u+x,g-w`, `a=rX`) applied to each
//! copied file's own mode, as `chmod(1)` does (with no umask).

use kiln_dag::Chmod;

use super::FileOpError;

/// A parsed `--chmod`.
#[derive(Clone, Debug)]
pub(super) enum ModeSpec {
    /// Replaces the permission bits, set-id and sticky bits included.
    Octal(u32),
    Symbolic(Vec<Clause>),
}

#[derive(Clone, Debug)]
pub(super) struct Clause {
    /// Which bits the clause may touch (`u` = 0o4700, `g` = 0o2070, `o` = 0o1007).
    who: u32,
    actions: Vec<(Op, Perm)>,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Add,
    Remove,
    Set,
}

#[derive(Clone, Copy, Debug)]
enum Perm {
    /// `r`, `w`, `x`, `s`, `t` bits (before masking with `who`), and whether `X` was given.
    Bits { bits: u32, cond_exec: bool },
    /// `u`, `g` or `o`: copy that class's current bits.
    Copy(u32),
}

impl ModeSpec {
    /// Parses a `--chmod` value.
    pub(super) fn parse(chmod: &Chmod) -> Result<ModeSpec, FileOpError> {
        match chmod {
            Chmod::Octal(m) => {
                if *m > 0o7777 {
                    return Err(FileOpError::InvalidChmod {
                        value: format!("{m:o}"),
                        reason: "octal mode above 7777".into(),
                    });
                }
                Ok(ModeSpec::Octal(*m))
            }
            Chmod::Symbolic(s) => {
                parse_symbolic(s)
                    .map(ModeSpec::Symbolic)
                    .map_err(|reason| FileOpError::InvalidChmod {
                        value: s.clone(),
                        reason: reason.to_string(),
                    })
            }
        }
    }

    /// The permission bits (0o7777) for an entry whose current `st_mode` is `mode`.
    pub(super) fn apply(&self, mode: u32, is_dir: bool) -> u32 {
        match self {
            ModeSpec::Octal(m) => m & 0o7777,
            ModeSpec::Symbolic(clauses) => {
                let mut m = mode & 0o7777;
                for clause in clauses {
                    for (op, perm) in &clause.actions {
                        let bits = match perm {
                            Perm::Bits { bits, cond_exec } => {
                                let mut b = *bits;
                                if *cond_exec && (is_dir || m & 0o111 != 0) {
                                    b |= 0o111;
                                }
                                b & clause.who
                            }
                            Perm::Copy(shift) => {
                                let v = (m >> shift) & 0o7;
                                (v | v << 3 | v << 6) & clause.who
                            }
                        };
                        m = match op {
                            Op::Add => m | bits,
                            Op::Remove => m & !bits,
                            Op::Set => (m & !(clause.who & 0o7777)) | bits,
                        };
                    }
                }
                m
            }
        }
    }
}

fn parse_symbolic(s: &str) -> Result<Vec<Clause>, &'static str> {
    if s.is_empty() {
        return Err("empty mode");
    }
    let mut clauses = Vec::new();
    for part in s.split(',') {
        let chars: Vec<char> = part.chars().collect();
        let mut i = 0;
        let mut who = 0u32;
        while let Some(&c) = chars.get(i) {
            who |= match c {
                'u' => 0o4700,
                'g' => 0o2070,
                'o' => 0o1007,
                'a' => 0o7777,
                _ => break,
            };
            i += 1;
        }
        if who == 0 {
            who = 0o7777;
        }
        let mut actions = Vec::new();
        while let Some(&c) = chars.get(i) {
            let op = match c {
                '+' => Op::Add,
                '-' => Op::Remove,
                '=' => Op::Set,
                _ => return Err("expected one of `+`, `-`, `=`"),
            };
            i += 1;
            match chars.get(i) {
                Some('u') | Some('g') | Some('o') => {
                    let shift = match chars[i] {
                        'u' => 6,
                        'g' => 3,
                        _ => 0,
                    };
                    actions.push((op, Perm::Copy(shift)));
                    i += 1;
                }
                _ => {
                    let mut bits = 0u32;
                    let mut cond_exec = false;
                    while let Some(&c) = chars.get(i) {
                        match c {
                            'r' => bits |= 0o444,
                            'w' => bits |= 0o222,
                            'x' => bits |= 0o111,
                            'X' => cond_exec = true,
                            's' => bits |= 0o6000,
                            't' => bits |= 0o1000,
                            _ => break,
                        }
                        i += 1;
                    }
                    actions.push((op, Perm::Bits { bits, cond_exec }));
                }
            }
        }
        if actions.is_empty() {
            return Err("missing `+`, `-` or `=` in a clause");
        }
        clauses.push(Clause { who, actions });
    }
    Ok(clauses)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sym(s: &str) -> ModeSpec {
        ModeSpec::parse(&Chmod::Symbolic(s.into())).unwrap()
    }

    #[test]
    fn symbolic_modes() {
        assert_eq!(sym("u+x,g-w").apply(0o100664, false), 0o744);
        assert_eq!(sym("a=rX").apply(0o100644, false), 0o444);
        assert_eq!(sym("a=rX").apply(0o040700, true), 0o555);
        assert_eq!(sym("go=u").apply(0o100750, false), 0o777 & 0o777);
        assert_eq!(sym("+x").apply(0o100644, false), 0o755);
        assert_eq!(sym("u+s").apply(0o100755, false), 0o4755);
        assert_eq!(sym("o=").apply(0o100777, false), 0o770);
        assert!(ModeSpec::parse(&Chmod::Symbolic("u*x".into())).is_err());
        assert!(ModeSpec::parse(&Chmod::Symbolic("u".into())).is_err());
        assert_eq!(ModeSpec::Octal(0o4755).apply(0o100600, false), 0o4755);
    }
}
