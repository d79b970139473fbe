//! What Docker's seccomp profile costs: compiling it (once per process and capability set) and
//! installing it (once per container, in the child before it executes the command), timed in
//! forked children that install the filter or not and then make 200 `stat` calls.
//!
//! As root: `cargo run --release -p kiln-runtime --example seccomp_cost [N]`

use std::time::Instant;

use kiln_runtime::caps::DOCKER_DEFAULT_MASK;
use kiln_runtime::seccomp::{self, SeccompPolicy};
use kiln_runtime::sys::{self, Cloned, RealSys, Sys};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(500);
    let t = Instant::now();
    let program = seccomp::program(&SeccompPolicy::Default, DOCKER_DEFAULT_MASK)?.ok_or("no program")?;
    println!(
        "compile (once per process): {:.1} ms, {} instructions",
        t.elapsed().as_secs_f64() * 1e3,
        program.instructions.len()
    );
    for install in [false, true, false, true] {
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            match sys::clone_child(0)? {
                Cloned::Child => {
                    if install
                        && RealSys
                            .seccomp_filter(&program.instructions, program.flags)
                            .is_err()
                    {
                        sys::exit_child(1);
                    }
                    for _ in 0..200 {
                        let _ = nix::sys::stat::stat("/");
                    }
                    sys::exit_child(0)
                }
                Cloned::Parent(pid) => {
                    if sys::wait_pid(pid, true)? != sys::Exit::Code(0) {
                        return Err("the child failed to install the filter".into());
                    }
                }
            }
            times.push(t.elapsed().as_secs_f64() * 1e6);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "fork + {}200 stat + exit: median {:.0} us, p10 {:.0} us",
            if install { "install filter + " } else { "" },
            times[times.len() / 2],
            times[times.len() / 10]
        );
    }
    Ok(())
}
