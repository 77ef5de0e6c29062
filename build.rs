//! Compiles the compute shaders in `shaders/` with `glslangValidator` when it is installed, else
//! uses the checked-in SPIR-V next to each source (glslang's output is byte-stable, and a test
//! compares the two). Either way the SPIR-V lands in `OUT_DIR` for `include_bytes!`.

use std::path::Path;
use std::process::Command;

const SHADERS: &[&str] = &["walk_gather", "copy_words", "populate"];

fn main() {
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    println!("cargo:rerun-if-env-changed=PATH");
    for name in SHADERS {
        let src = format!("shaders/{name}.comp");
        let checked_in = format!("shaders/{name}.spv");
        println!("cargo:rerun-if-changed={src}");
        println!("cargo:rerun-if-changed={checked_in}");
        let dst = Path::new(&out).join(format!("{name}.spv"));
        let compiled = Command::new("glslangValidator")
            .args(["--target-env", "vulkan1.2", "-V", &src, "-o"])
            .arg(&dst)
            .output();
        match compiled {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "glslangValidator failed on {src}:\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            // No glslang here: the checked-in SPIR-V.
            Err(_) => {
                std::fs::copy(&checked_in, &dst).unwrap_or_else(|e| panic!("copying {checked_in}: {e}"));
            }
        }
    }
}
