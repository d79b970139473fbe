//! Lowering errors. Every error carries the Dockerfile position it is about and renders like a
//! compiler diagnostic: `Dockerfile:LINE:COL: message`, then the line, then a caret.

use std::fmt;

/// A cause an [`super::ImageResolver`] hands through from the layers it calls (the image store,
/// a registry client): the frontend only displays and chains it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why an [`super::ImageResolver`] could not produce an image; kept as the cause of
/// [`LowerError::ResolveImage`]. Every variant names the reference as written.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    /// The resolver knows no image of that name and has nowhere else to look.
    #[error("image {reference} not found in {place}")]
    NotFound {
        reference: String,
        /// Where the resolver looked (`the local store`).
        place: String,
    },
    /// Not in the local store, and the name is not a reference a registry could serve.
    #[error("{reference}: not found in the local store ({local}); not a pullable reference ({reason})")]
    NotPullable {
        reference: String,
        /// Why the local lookup failed.
        local: BoxError,
        /// Why the name is not a registry reference.
        reason: BoxError,
    },
    /// Not in the local store, and pulling it failed.
    #[error("{reference}: not found in the local store, and pulling failed")]
    Pull {
        reference: String,
        #[source]
        source: BoxError,
    },
    /// `--pull`: asking the registry again failed (a local image exists).
    #[error("{reference}: --pull")]
    Repull {
        reference: String,
        #[source]
        source: BoxError,
    },
    /// The image was found or pulled, but could not be read.
    #[error("{reference}")]
    Read {
        reference: String,
        #[source]
        source: BoxError,
    },
}

/// What went wrong while lowering, without the position (see [`FrontendError`]).
#[derive(Debug, thiserror::Error)]
pub enum LowerError {
    #[error("the dockerfile cannot be empty")]
    Empty,
    #[error("{message}")]
    Parse { message: String },
    #[error("dockerfile contains no stages to build")]
    NoStages,
    #[error("no build stage in current context: {keyword} must come after FROM")]
    InstructionBeforeFrom { keyword: String },
    #[error("failed to expand `{word}`")]
    Expand {
        word: String,
        #[source]
        source: crate::shell::ShellError,
    },
    #[error("base name ({image}) should not be blank")]
    BlankBaseName { image: String },
    #[error("{reason}")]
    BadPlatform {
        value: String,
        reason: kiln_dag::PlatformError,
    },
    #[error("target stage \"{target}\" could not be found{}", suggestion_text(.suggestion))]
    UnknownTarget {
        target: String,
        suggestion: Option<String>,
    },
    #[error("invalid stage index {index}")]
    BadStageIndex { index: String },
    #[error("cannot copy from stage \"{from}\", it needs to be defined before current stage \"{stage}\"")]
    LaterStage { from: String, stage: String },
    #[error("circular dependency detected on stage: {stage}")]
    Circular { stage: String },
    #[error(
        "variable expansion is not supported for --from, define a new stage with FROM using ARG from global scope as a workaround"
    )]
    FromVariable { from: String },
    #[error("{keyword} requires at least one source")]
    NoSources { keyword: String },
    #[error("invalid --chown value `{value}`: {reason}")]
    BadChown { value: String, reason: String },
    #[error("invalid --chmod value `{value}`: expected octal bits (0755) or symbolic mode (u+x,g-w)")]
    BadChmod { value: String },
    #[error("invalid --checksum value `{value}`: expected sha256:<64 hex digits>")]
    BadChecksum {
        value: String,
        #[source]
        source: kiln_dag::DigestError,
    },
    #[error("--checksum is only supported for HTTP(S) sources, not `{source_path}`")]
    ChecksumNotHttp { source_path: String },
    #[error("invalid --mount value `{spec}`: {reason}")]
    BadMount { spec: String, reason: String },
    #[error("invalid --network value `{value}`: expected default, none or host")]
    BadNetwork { value: String },
    #[error("invalid --security value `{value}`: expected sandbox or insecure")]
    BadSecurity { value: String },
    #[error("invalid HEALTHCHECK --{flag} value `{value}`: {reason}")]
    BadHealthcheck {
        flag: String,
        value: String,
        reason: String,
    },
    #[error("VOLUME specified can not be an empty string")]
    EmptyVolume,
    #[error("invalid port `{port}`: {reason}")]
    BadPort { port: String, reason: String },
    #[error("invalid STOPSIGNAL `{signal}`: not a signal name or number")]
    BadSignal { signal: String },
    #[error("{keyword} isn't allowed as an ONBUILD trigger")]
    BadOnbuild { keyword: String },
    #[error("invalid ONBUILD trigger `{trigger}` from the base image: {message}")]
    TriggerParse { trigger: String, message: String },
    #[error("failed to resolve image `{reference}`")]
    ResolveImage {
        reference: String,
        #[source]
        source: ResolverError,
    },
    #[error("{instruction} requires a command")]
    EmptyCommand { instruction: String },
    #[error("failed to parse {origin}")]
    CheckOptions {
        origin: String,
        #[source]
        source: crate::lint::CheckConfigError,
    },
    #[error("lint violation found for rules: {}", rules.join(", "))]
    LintViolation { rules: Vec<String> },
}

fn suggestion_text(s: &Option<String>) -> String {
    match s {
        Some(s) => format!(" (did you mean {s}?)"),
        None => String::new(),
    }
}

/// A lowering error at a Dockerfile position (1-based line and column; 0 when the error is not
/// tied to a line, such as an unknown `--target`).
#[derive(Debug)]
pub struct FrontendError {
    /// The Dockerfile's name as given in [`super::LowerOptions::dockerfile_name`].
    pub file: String,
    /// 1-based line, 0 when unknown.
    pub line: u32,
    /// 1-based column (in characters), 0 when unknown.
    pub column: u32,
    /// What went wrong.
    pub kind: Box<LowerError>,
    /// The checks' warnings found before the error (BuildKit shows them with it).
    pub warnings: Vec<crate::lint::Warning>,
}

impl FrontendError {
    /// An error at `line`:`column` of `file`, with no warnings.
    pub fn new(file: &str, line: u32, column: u32, kind: LowerError) -> FrontendError {
        FrontendError {
            file: file.to_string(),
            line,
            column,
            kind: Box::new(kind),
            warnings: Vec::new(),
        }
    }

    /// The compiler-style rendering: `FILE:LINE:COL: message`, then the offending line of
    /// `source` (the Dockerfile bytes that were lowered), then a caret under the column.
    ///
    /// The causes of the error (a resolver's reason, a shell expansion error) follow the message
    /// on the first line, separated by `: `, since the caller prints only this text.
    pub fn render(&self, source: &[u8]) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(&*self.kind);
        while let Some(c) = cause {
            out.push_str(": ");
            out.push_str(&c.to_string());
            cause = c.source();
        }
        if self.line == 0 {
            return out;
        }
        out.push('\n');
        out.push_str(&crate::parser::source_excerpt(source, self.line, self.column));
        out
    }
}

impl fmt::Display for FrontendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.kind)
        } else {
            write!(f, "{}:{}:{}: {}", self.file, self.line, self.column, self.kind)
        }
    }
}

impl std::error::Error for FrontendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&*self.kind)
    }
}

/// The closest candidate to `word` by edit distance (case-insensitive), if it is close enough.
pub(crate) fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let w = word.to_ascii_lowercase();
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = edit_distance(&w, &c.to_ascii_lowercase());
        if best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    let (d, c) = best?;
    let limit = (w.chars().count() / 3).max(2);
    (d > 0 && d <= limit).then(|| c.to_string())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(suggest("biuld", ["build", "test"]), Some("build".into()));
        assert_eq!(suggest("zzzzzz", ["build", "test"]), None);
        assert_eq!(suggest("build", ["build"]), None);
    }

    #[test]
    fn render_has_caret() {
        let e = FrontendError {
            file: "Dockerfile".into(),
            line: 2,
            column: 3,
            kind: Box::new(LowerError::EmptyVolume),
            warnings: Vec::new(),
        };
        assert_eq!(
            e.render(b"FROM a\n\tCOPY a\n"),
            "Dockerfile:2:3: VOLUME specified can not be an empty string\n\tCOPY a\n\t ^"
        );
    }
}
