//! How a failure is worded to the user, as Docker words it.

use kiln_runtime::RuntimeError;

/// Docker's words for a command that could not be executed (`exec: "nope": executable file
/// not found in $PATH`, `exec: "/etc": permission denied`), `None` for other failures.
pub fn docker_exec_message(err: &RuntimeError) -> Option<String> {
    use nix::errno::Errno;
    let RuntimeError::Exec { command, source } = err else {
        return None;
    };
    let why = match *source {
        Errno::ENOENT if !command.contains('/') => "executable file not found in $PATH",
        Errno::ENOENT => "no such file or directory",
        Errno::EACCES | Errno::EPERM | Errno::EISDIR => "permission denied",
        Errno::ENOEXEC => "exec format error",
        _ => return None,
    };
    Some(format!(
        "exec failed: unable to start container process: exec: {command:?}: {why}"
    ))
}

/// `err` and its causes joined by `: `.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
