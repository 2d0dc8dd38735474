//! Records the git commit the programs are built from, for `--version` (and the status page).
//! `BACKHAUL_GIT_COMMIT` set at build time wins (for builds outside a git checkout, such as
//! packages built from a tarball); without either, the commit reads `unknown`.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=BACKHAUL_GIT_COMMIT");
    let commit = std::env::var("BACKHAUL_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=BACKHAUL_GIT_COMMIT={commit}");
    // Build again when HEAD moves: HEAD itself, and the branch it names.
    let git = Path::new("../.git");
    if git.join("HEAD").exists() {
        println!("cargo:rerun-if-changed=../.git/HEAD");
        if let Ok(head) = std::fs::read_to_string(git.join("HEAD")) {
            if let Some(branch) = head.trim().strip_prefix("ref: ") {
                println!("cargo:rerun-if-changed=../.git/{branch}");
            }
        }
        println!("cargo:rerun-if-changed=../.git/packed-refs");
    }
}

fn git_commit() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|c| !c.is_empty())
}
