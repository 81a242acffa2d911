//! The tcp-dsc lab: the containerlab topology in `deploy/containerlab/` realised as Linux
//! network namespaces, the cluster started on top of it, and the tools the end-to-end tests
//! and benchmarks use.
//!
//! The flow, bottom-up:
//!
//! 1. [`topology`] parses the containerlab YAML into a model (pure).
//! 2. [`lab`] realises it: one namespace per node (`clab-<lab>-<node>`), bridges in
//!    namespaces of their own, veths, sysctls and `exec` lines. [`lab::Lab`] tears it all
//!    down in `Drop`.
//! 3. [`cluster`] writes each node's tdscd config, starts `tdscd` and `tdsc-lab-httpd` in the
//!    namespaces and waits for `tdscctl status` to answer.
//! 4. [`netns::run_in`] runs client code inside a namespace; [`http`] and the packet tools
//!    are what the clients, tests and benchmarks use.
//!
//! The same topology also deploys as real containers: [`docker`] does for it what
//! `containerlab deploy` does, and pins each container's namespace under the same name, so the
//! clients and checks above work on either engine (`tdsc-lab --engine docker`).
//!
//! Everything needs root; without it the end-to-end tests print `SKIP` and pass, except under
//! CI (`CI=true`), where they fail ([`netns::root_or_skip`]).
//!
//! ```
//! use tdsc_lab::topology::{Role, Topology};
//! let topo = Topology::load(&tdsc_lab::cluster::default_topology_path()).unwrap();
//! assert_eq!(topo.nodes_with_role(Role::ClusterNode), ["node1", "node2", "node3"]);
//! assert_eq!(topo.renamed("tdsc-doc").unwrap().netns_name("node1"), "clab-tdsc-doc-node1");
//! ```

pub mod bench;
pub mod bins;
pub mod cluster;
pub mod dispatchbench;
pub mod docker;
pub mod floodbench;
pub mod http;
pub mod lab;
pub mod load;
pub mod netns;
pub mod nft;
pub mod packet;
pub mod policybench;
pub mod status;
pub mod streams;
pub mod topology;
pub mod wakeup;

/// An error and all its sources, `: `-separated, for one-line reports.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}
