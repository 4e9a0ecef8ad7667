//! A test bed of hosts on their own network addresses (issue 15's fleet): a Linux bridge in the
//! root namespace (the server, Redis and the test's players live there, at the bridge's
//! address `10.77.B.1`), and per host a network namespace joined to the bridge by a veth pair,
//! with its own address `10.77.B.(10+i)`. A hostd started in a host's namespace
//! ([`NsHost::command`]) reaches the server at [`Bed::gateway_ip`], and players reach its
//! gateway at [`NsHost::ip`]: nothing is loopback between them.
//!
//! A host can be cut off ([`NsHost::cut`]: its link goes down) and brought back. Every
//! namespace and link is named `bb<B>…` and removed by the [`Bed`]'s `Drop`; [`sweep`] also
//! removes what a crashed run left (`Bed::new` calls it for its own block). Needs root and
//! `iproute2`.

use anyhow::{bail, Context, Result};
use std::net::Ipv4Addr;
use std::process::Command;

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2 is needed)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `ip` that may fail (cleanup of what may not exist).
fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

/// Namespaces and links whose names start with `bb<block>`.
fn named(block: u8) -> (Vec<String>, Vec<String>) {
    let prefix = format!("bb{block}");
    let listed = |args: &[&str]| -> String {
        Command::new("ip")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let namespaces = listed(&["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    // "7: bb3h1r@if6: <…>": the name is the second field, before any '@'.
    let links = listed(&["-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or_default().to_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    (namespaces, links)
}

/// Removes every namespace and link of block `block` (a crashed run's leftovers).
pub fn sweep(block: u8) {
    let (namespaces, links) = named(block);
    for ns in namespaces {
        ip_quiet(&["netns", "del", &ns]);
    }
    for link in links {
        ip_quiet(&["link", "del", &link]);
    }
}

/// Namespaces and links of block `block` that exist now (empty after a clean run).
pub fn leftovers(block: u8) -> Vec<String> {
    let (namespaces, links) = named(block);
    let ns = namespaces.into_iter().map(|n| format!("netns {n}"));
    ns.chain(links.into_iter().map(|l| format!("link {l}")))
        .collect()
}

/// The bridge and its hosts. Dropping it removes every namespace and link it made.
#[derive(Debug)]
pub struct Bed {
    block: u8,
    bridge: String,
    hosts: Vec<String>,
}

/// One host's namespace on the bed.
#[derive(Debug, Clone)]
pub struct NsHost {
    /// The namespace (`ip netns exec NAME …`).
    pub ns: String,
    /// The root end of its veth pair (down = cut off).
    link: String,
    /// Its address on the bridge.
    pub ip: Ipv4Addr,
}

impl Bed {
    /// A bridge `bb<block>br` at `10.77.<block>.1/24`. `block` (1..=250) keeps concurrent beds
    /// apart; whatever an earlier run left in that block is removed first.
    pub fn new(block: u8) -> Result<Bed> {
        sweep(block);
        let bridge = format!("bb{block}br");
        let bed = Bed {
            block,
            bridge: bridge.clone(),
            hosts: Vec::new(),
        };
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", bed.gateway_ip()),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;
        Ok(bed)
    }

    /// The bridge's address: where hosts reach the server.
    pub fn gateway_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.block, 1)
    }

    /// Host `i` (0..=200): its namespace, with loopback up and its address on the bridge.
    pub fn add_host(&mut self, i: u8) -> Result<NsHost> {
        let ns = format!("bb{}h{i}", self.block);
        let (root_end, ns_end) = (
            format!("bb{}h{i}r", self.block),
            format!("bb{}h{i}n", self.block),
        );
        let addr = Ipv4Addr::new(10, 77, self.block, 10 + i);
        ip(&["netns", "add", &ns])?;
        self.hosts.push(ns.clone());
        ip(&[
            "link", "add", &root_end, "type", "veth", "peer", "name", &ns_end,
        ])?;
        ip(&["link", "set", &root_end, "master", &self.bridge])?;
        ip(&["link", "set", &root_end, "up"])?;
        ip(&["link", "set", &ns_end, "netns", &ns])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["-n", ns.as_str()];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["link", "set", "lo", "up"])?;
        inside(&["addr", "add", &format!("{addr}/24"), "dev", &ns_end])?;
        inside(&["link", "set", &ns_end, "up"])?;
        Ok(NsHost {
            ns,
            link: root_end,
            ip: addr,
        })
    }
}

impl NsHost {
    /// `program` to be run inside this host's namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }

    /// Cuts the host off the bridge (its link goes down): nothing reaches it, it reaches
    /// nothing, but it runs on.
    pub fn cut(&self) -> Result<()> {
        ip(&["link", "set", &self.link, "down"])
    }

    /// Brings it back.
    pub fn restore(&self) -> Result<()> {
        ip(&["link", "set", &self.link, "up"])
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for ns in &self.hosts {
            ip_quiet(&["netns", "del", ns]);
        }
        ip_quiet(&["link", "del", &self.bridge]);
        sweep(self.block);
    }
}
