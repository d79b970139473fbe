//! Lexical path cleaning with Go's `path/filepath.Clean` rules on `/`-separated paths.

/// Returns the shortest path equivalent to `path` by purely lexical processing: repeated `/`
/// collapse to one, `.` elements go, `..` eats the element before it (and is dropped at the root
/// of a rooted path), and a trailing `/` goes. The empty path becomes `.`.
pub fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut stack: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => match stack.last() {
                Some(&top) if top != ".." => {
                    stack.pop();
                }
                _ if rooted => {}
                _ => stack.push(".."),
            },
            other => stack.push(other),
        }
    }
    let joined = stack.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_follows_go() {
        let cases = [
            ("", "."),
            (".", "."),
            ("/", "/"),
            ("//", "/"),
            ("a/", "a"),
            ("a//b", "a/b"),
            ("./a/./b/.", "a/b"),
            ("a/../b", "b"),
            ("../a", "../a"),
            ("a/../../b", "../b"),
            ("/../a", "/a"),
            ("/a/b/../..", "/"),
            ("**/", "**"),
            ("!./foo", "!./foo"),
            ("abc/def/../../..", ".."),
        ];
        for (input, want) in cases {
            assert_eq!(clean(input), want, "clean({input:?})");
        }
    }
}
