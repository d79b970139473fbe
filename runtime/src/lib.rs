//! Linux execution: namespaces, overlay, pivot_root, exec.
