//! The Xen driver, as in the paper: `xl save`/`xl restore` substrates and identity through
//! XenStore.
//!
//! **Untested on real Xen.** These machines have no Xen; what is tested here is the
//! construction of every `xl` command and XenStore path (unit tests below). The driver itself
//! is behind the `xen` cargo feature and only builds there.
//!
//! Layout: prime = `xl create` the image's config, wait for the agent's `initialised` key,
//! `xl mem-set` down (miniaturisation), `xl save` to the substrate's `state`. Activate =
//! `xl restore -p` (paused), look the new domid up (it changes on every restore), write the
//! identity under `/local/domain/<domid>/data/berth/identity`, `xl unpause`, wait for the
//! agent's `ready` key. The agent reads and writes its keys through xenbus
//! (`/dev/xen/xenbus`) with `xenstore-rs`.

use berth_protocol::VmId;
use std::path::Path;

/// XenStore paths of one domain's agent keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentKeys {
    pub base: String,
}

impl AgentKeys {
    pub fn for_domid(domid: u32) -> Self {
        Self {
            base: format!("/local/domain/{domid}/data/berth"),
        }
    }
    /// hostd → agent: the identity JSON line.
    pub fn identity(&self) -> String {
        format!("{}/identity", self.base)
    }
    /// agent → hostd: the `initialised` message.
    pub fn initialised(&self) -> String {
        format!("{}/initialised", self.base)
    }
    /// agent → hostd: the `ready` message.
    pub fn ready(&self) -> String {
        format!("{}/ready", self.base)
    }
    /// agent → hostd: heartbeats and `ended`.
    pub fn event(&self) -> String {
        format!("{}/event", self.base)
    }
}

/// The domain name hostd gives a VM: `berth-<vm id>`.
pub fn domain_name(vm_id: &VmId) -> String {
    format!("berth-{vm_id}")
}

/// `xl create` for priming: the config file, paused so hostd can watch keys first.
pub fn xl_create(config: &Path) -> Vec<String> {
    vec!["xl".into(), "create".into(), config.display().to_string()]
}

/// `xl mem-set` for miniaturisation.
pub fn xl_mem_set(domain: &str, mib: u32) -> Vec<String> {
    vec![
        "xl".into(),
        "mem-set".into(),
        domain.into(),
        format!("{mib}m"),
    ]
}

/// `xl save` into the substrate's state file (the domain is destroyed by it).
pub fn xl_save(domain: &str, state: &Path) -> Vec<String> {
    vec![
        "xl".into(),
        "save".into(),
        domain.into(),
        state.display().to_string(),
    ]
}

/// `xl restore`, paused, with a new name for the clone.
pub fn xl_restore(state: &Path, new_name: &str) -> Vec<String> {
    vec![
        "xl".into(),
        "restore".into(),
        "-p".into(),
        "-e".into(),
        "--".into(),
        state.display().to_string(),
    ]
    .into_iter()
    .chain(std::iter::once(format!("name=\"{new_name}\"")))
    .collect()
}

pub fn xl_unpause(domain: &str) -> Vec<String> {
    vec!["xl".into(), "unpause".into(), domain.into()]
}

pub fn xl_destroy(domain: &str) -> Vec<String> {
    vec!["xl".into(), "destroy".into(), domain.into()]
}

pub fn xl_domid(domain: &str) -> Vec<String> {
    vec!["xl".into(), "domid".into(), domain.into()]
}

/// The `xl` domain config for priming an image.
pub fn domain_config(
    name: &str,
    kernel: &Path,
    initrd: &Path,
    memory_mib: u32,
    vcpus: u32,
    cmdline: &str,
) -> String {
    format!(
        "name = \"{name}\"\ntype = \"pvh\"\nkernel = \"{}\"\nramdisk = \"{}\"\nmemory = {memory_mib}\nmaxmem = {memory_mib}\nvcpus = {vcpus}\nextra = \"{}\"\non_crash = \"destroy\"\n",
        kernel.display(),
        initrd.display(),
        cmdline.replace('"', "")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_domid() {
        let k = AgentKeys::for_domid(7);
        assert_eq!(k.identity(), "/local/domain/7/data/berth/identity");
        assert_eq!(k.ready(), "/local/domain/7/data/berth/ready");
        assert_ne!(AgentKeys::for_domid(8).identity(), k.identity());
    }

    #[test]
    fn commands_are_built_as_argument_lists() {
        let vm = VmId::new("vm-1").expect("valid");
        let name = domain_name(&vm);
        assert_eq!(name, "berth-vm-1");
        assert_eq!(
            xl_mem_set(&name, 96),
            ["xl", "mem-set", "berth-vm-1", "96m"]
        );
        assert_eq!(
            xl_save(&name, Path::new("/run/s/state")),
            ["xl", "save", "berth-vm-1", "/run/s/state"]
        );
        let r = xl_restore(Path::new("/run/s/state"), "berth-vm-2");
        assert_eq!(r[..3], ["xl", "restore", "-p"]);
        assert_eq!(r.last().map(String::as_str), Some("name=\"berth-vm-2\""));
        assert_eq!(xl_destroy(&name), ["xl", "destroy", "berth-vm-1"]);
    }

    #[test]
    fn domain_config_cannot_be_broken_by_quotes() {
        let c = domain_config("d", Path::new("/k"), Path::new("/i"), 128, 1, "a=\"b\" c");
        assert!(c.contains("extra = \"a=b c\""));
        assert!(c.contains("memory = 128"));
        assert!(c.contains("type = \"pvh\""));
    }
}
