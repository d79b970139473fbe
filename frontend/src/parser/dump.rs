//! The AST dump format of BuildKit's `Node.Dump` (the `result` files of the test corpus).

use super::gotext::{quote, to_lower, trim_space};
use super::{Dockerfile, Node};

fn dump_node(node: &Node) -> String {
    let mut s = to_lower(&node.keyword);
    if !node.flags.is_empty() {
        let flags: Vec<String> = node.flags.iter().map(|f| quote(f)).collect();
        s.push_str(" [");
        s.push_str(&flags.join(" "));
        s.push(']');
    }
    if let Some(child) = &node.next {
        s.push_str(" (");
        s.push_str(&dump_node(child));
        s.push(')');
    }
    for arg in &node.args {
        s.push(' ');
        s.push_str(&quote(arg));
    }
    trim_space(&s).to_string()
}

/// Renders the tree one `(keyword ...)` line per instruction, each ending with a newline.
pub fn dump(df: &Dockerfile) -> String {
    let mut out = String::new();
    for node in &df.nodes {
        out.push('(');
        out.push_str(&dump_node(node));
        out.push_str(")\n");
    }
    out
}
