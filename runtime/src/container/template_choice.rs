//! Whether a container's micro-VM is cloned from a template or cold-booted, decided by
//! `create` (where stderr is husk's own, so a first-use build can report progress).

use anyhow::{bail, Result};
use husk_templates::{Store, DEFAULT_NAME};

use super::bundle::Bundle;
use crate::template::{self, DEFAULT_MEMORY_MIB, DEFAULT_VCPUS};

/// The annotation that picks a template by name, or `none` for a cold boot.
pub const ANNOTATION: &str = "io.husk.template";
/// Set to `1` to cold-boot every container (benchmarks).
pub const NO_TEMPLATE_ENV: &str = "HUSK_NO_TEMPLATE";

/// The template to clone, or `None` to cold-boot; `why` hears the reason for a cold boot.
pub fn choose(bundle: &Bundle, no_template: bool, why: &dyn Fn(&str)) -> Result<Option<String>> {
    let annotation = bundle
        .spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(ANNOTATION).cloned());
    if no_template || std::env::var(NO_TEMPLATE_ENV).is_ok_and(|v| v == "1") {
        why("cold boot: templates are off (--no-template or HUSK_NO_TEMPLATE=1)");
        return Ok(None);
    }
    let store = Store::from_env();
    let size = bundle.vm_size();
    match annotation.as_deref() {
        Some("none") => {
            why("cold boot: the bundle's io.husk.template annotation is \"none\"");
            Ok(None)
        }
        None | Some(DEFAULT_NAME) => {
            if size != (DEFAULT_VCPUS, DEFAULT_MEMORY_MIB) {
                why(&format!(
                    "cold boot: the bundle asks for {} vCPU(s) and {} MiB, the default template has {DEFAULT_VCPUS} and {DEFAULT_MEMORY_MIB} MiB",
                    size.0, size.1
                ));
                return Ok(None);
            }
            template::ensure_default(&store)?;
            Ok(Some(DEFAULT_NAME.to_string()))
        }
        Some(name) => named(&store, name, size, why),
    }
}

/// A template built by `husk template build NAME`; never built implicitly (its settings
/// are only known to whoever built it).
fn named(store: &Store, name: &str, size: (u8, u32), why: &dyn Fn(&str)) -> Result<Option<String>> {
    let Some(t) = store.open(name)? else {
        bail!("template {name} (annotation {ANNOTATION}) does not exist; build it with `husk template build {name}`");
    };
    let s = &t.manifest.settings;
    if size != (s.vcpus, s.memory_mib) {
        why(&format!(
            "cold boot: the bundle asks for {} vCPU(s) and {} MiB, template {name} has {} and {} MiB",
            size.0, size.1, s.vcpus, s.memory_mib
        ));
        return Ok(None);
    }
    Ok(Some(name.to_string()))
}
