//! Replacement kernel files read from a folder: `flash-bench --shader-dir`
//! and the criterion benches' `FLASH_ATTN_BENCH_SHADER_DIR` compare a
//! kernel's edited WGSL against the built-in one without a rebuild.
//!
//! flash-bench's own module; the benches include the file with `#[path]`,
//! so it uses nothing but the library's public API.

use std::path::Path;

use anyhow::{Context, Result, bail};

/// (file name, text) of every `.wgsl` file in `dir`, sorted by name: the
/// names are those of the crate's `shaders/` files they replace
/// ([`wgpu_flash_attn::Gpu::override_shader_file`]). A folder without one
/// is an error (a mistyped path would otherwise time the built-in kernels).
pub fn read_shader_dir(dir: &Path) -> Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wgsl") {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            files.push((name, text));
        }
    }
    if files.is_empty() {
        bail!("{} holds no .wgsl file", dir.display());
    }
    files.sort();
    Ok(files)
}
