use std::path::Path;

pub fn run(_dir: &Path) -> crate::Outcome {
    crate::Outcome::default()
}
