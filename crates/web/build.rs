//! Embeds `web/app`, `web/lib` and `web/vendor` (plain files, no build step)
//! into the binary: `$OUT_DIR/assets.rs` lists every file with its bytes and
//! a content hash for its ETag.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with('.') || name == "node_modules" {
            continue;
        }
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// FNV-1a: enough to tell versions of a file apart in an ETag.
fn fnv(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let web = manifest.join("../../web").canonicalize().expect("the web/ folder of the repository");
    let mut files = Vec::new();
    for sub in ["app", "lib", "vendor"] {
        let dir = web.join(sub);
        println!("cargo:rerun-if-changed={}", dir.display());
        walk(&dir, &mut files);
    }
    let mut code = String::from(
        "/// Every embedded file: (URL path, bytes, content hash).\npub static ASSETS: &[(&str, &[u8], u64)] = &[\n",
    );
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
        let rel = f.strip_prefix(&web).expect("under web/").to_string_lossy().replace('\\', "/");
        let bytes = std::fs::read(f).expect("readable asset");
        writeln!(
            code,
            "    ({:?}, include_bytes!({:?}), {}),",
            format!("/{rel}"),
            f.display().to_string(),
            fnv(&bytes)
        )
        .expect("writing to a String");
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it")).join("assets.rs");
    std::fs::write(out, code).expect("writable OUT_DIR");
}
