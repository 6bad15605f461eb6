//! `flash-bench info`: every adapter wgpu finds.

use anyhow::{Result, bail};

use crate::options::GlobalArgs;
use crate::report::{AdapterJson, write_json};

pub fn run(global: &GlobalArgs) -> Result<bool> {
    let options = global.adapter_options();
    let adapters: Vec<AdapterJson> = options
        .enumerate()
        .iter()
        .map(|a| AdapterJson::new(&a.get_info(), a.features(), &a.limits()))
        .filter(|a| {
            options
                .adapter_name
                .as_ref()
                .is_none_or(|wanted| a.name.to_lowercase().contains(&wanted.to_lowercase()))
        })
        .collect();
    if adapters.is_empty() {
        bail!(
            "no adapter found for backends {:?}{}; without a GPU on Debian/Ubuntu: \
             apt-get install mesa-vulkan-drivers libvulkan1",
            options.backends,
            options
                .adapter_name
                .as_ref()
                .map_or(String::new(), |n| format!(" matching {n:?}"))
        );
    }
    for adapter in &adapters {
        println!("{}\n{}\n", adapter.name, adapter.describe());
    }
    if let Some(path) = &global.json {
        write_json(path, &adapters)?;
    }
    Ok(true)
}
