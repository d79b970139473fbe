//! Shell-word expansion (BuildKit lexer semantics).
