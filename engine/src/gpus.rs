//! Which GPUs nodes asking for `cuda` (no ordinal) spread over, and which node holds each one.
//!
//! A node whose device is plain `cuda` may run on any visible GPU ([`Resource::AnyGpu`]): the
//! local executor leases it a free one from the run's list and hands the stage that GPU's name
//! (`cuda:1`) through [`crate::RunContext::device`]. A node pinned to `cuda:N`
//! ([`Resource::Gpu`]) waits for that one. Either way no two nodes share a GPU slot, so `-j N`
//! on N GPUs trains N nodes at once. The device is a run setting: it never enters a key.
//!
//! The list, first found of:
//! 1. `--devices` (`cuda:0,cuda:1` or `0,1`), else `PROBEX_DEVICES` (same syntax);
//! 2. `CUDA_VISIBLE_DEVICES`: CUDA renumbers the GPUs it shows from 0, so `4,5` means
//!    `cuda:0,cuda:1` to this process;
//! 3. the stage library's probe ([`crate::Registry::set_gpu_probe`]; a `cuda` build counts the
//!    devices the driver shows), asked only when a node first needs a GPU;
//! 4. `cuda:0` alone (a build or machine without CUDA then fails that node with the stage's
//!    own clear error).
//!
//! A name listed twice is two slots: `--devices 0,0,1` runs two nodes at once on `cuda:0`.
//!
//! The engine knows devices only as names: what `cuda:1` means is the stage's business.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::stage::Resource;

/// The environment variable that lists the GPUs, as `--devices` does.
pub const ENV: &str = "PROBEX_DEVICES";

pub use crate::stage::{GpuProbe, GpuProbeError};

/// An item of a device list that names no GPU.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{item}` is not a GPU (expected a comma-separated list such as cuda:0,cuda:1 or 0,1)")]
pub struct NotAGpu {
    /// The item as written (trimmed).
    pub item: String,
}

/// A run's device list that cannot be read, naming where it came from.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GpuListError {
    /// The `--devices` flag.
    #[error("--devices {list}: {source}")]
    Flag {
        /// The flag's value.
        list: String,
        /// The item that names no GPU.
        #[source]
        source: NotAGpu,
    },
    /// The [`ENV`] variable.
    #[error("{ENV}={list}: {source}")]
    Env {
        /// The variable's value.
        list: String,
        /// The item that names no GPU.
        #[source]
        source: NotAGpu,
    },
}

/// Where the GPU list of a run comes from; resolved when a node first needs a GPU.
#[derive(Clone, Debug, Default)]
pub struct Gpus {
    /// The list given by `--devices` or [`ENV`], parsed, with where it came from.
    pub listed: Option<(Vec<String>, String)>,
    /// The stage library's probe, asked when nothing lists the GPUs.
    pub probe: Option<GpuProbe>,
}

impl Gpus {
    /// The settings of a run: `flag` (`--devices`) over `env` ([`ENV`]); an invalid list is an
    /// error that names where it came from.
    pub fn new(
        flag: Option<&str>,
        env: Option<&str>,
        probe: Option<GpuProbe>,
    ) -> Result<Self, GpuListError> {
        let listed = match (flag, env) {
            (Some(f), _) => Some((
                parse_list(f).map_err(|source| GpuListError::Flag {
                    list: f.to_owned(),
                    source,
                })?,
                "--devices".to_string(),
            )),
            (None, Some(e)) if !e.trim().is_empty() => Some((
                parse_list(e).map_err(|source| GpuListError::Env {
                    list: e.to_owned(),
                    source,
                })?,
                ENV.to_string(),
            )),
            _ => None,
        };
        Ok(Gpus { listed, probe })
    }

    /// Reads [`ENV`] from the environment.
    pub fn from_env(flag: Option<&str>, probe: Option<GpuProbe>) -> Result<Self, GpuListError> {
        let env = std::env::var(ENV).ok();
        Self::new(flag, env.as_deref(), probe)
    }

    /// The GPUs to spread over and where that list came from (for the logs), given the value
    /// of `CUDA_VISIBLE_DEVICES`. The probe runs here, so only when a GPU is needed.
    pub fn resolve(&self, cuda_visible: Option<&str>) -> (Vec<String>, String) {
        if let Some((list, from)) = &self.listed {
            return (list.clone(), from.clone());
        }
        if let Some(n) = cuda_visible.map(visible_count).filter(|&n| n > 0) {
            return (numbered(n), "CUDA_VISIBLE_DEVICES".to_string());
        }
        let why = match self.probe.map(|p| p()) {
            Some(Ok(n)) if n > 0 => return (numbered(n), "the devices CUDA reports".to_string()),
            Some(Ok(_)) => "CUDA reports no device".to_string(),
            Some(Err(e)) => e.to_string(),
            None => "nothing lists the GPUs".to_string(),
        };
        (vec!["cuda:0".to_string()], format!("the default ({why})"))
    }
}

/// `cuda:0` .. `cuda:{n-1}`.
fn numbered(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("cuda:{i}")).collect()
}

/// How many devices `CUDA_VISIBLE_DEVICES` shows: CUDA takes entries up to the first invalid
/// one (an ordinal, or a `GPU-`/`MIG-` UUID), so `-1` or an empty value shows none.
fn visible_count(v: &str) -> usize {
    v.split(',')
        .map(str::trim)
        .take_while(|e| {
            !e.is_empty()
                && (e.bytes().all(|b| b.is_ascii_digit())
                    || e.starts_with("GPU-")
                    || e.starts_with("MIG-"))
        })
        .count()
}

/// Parses a device list: comma-separated `cuda:N` or bare `N`, at least one.
pub fn parse_list(s: &str) -> Result<Vec<String>, NotAGpu> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim) {
        let n = item.strip_prefix("cuda:").unwrap_or(item);
        match n.parse::<u32>() {
            Ok(n) if !item.is_empty() => out.push(format!("cuda:{n}")),
            _ => {
                return Err(NotAGpu {
                    item: item.to_owned(),
                });
            }
        }
    }
    Ok(out)
}

/// One GPU slot.
#[derive(Debug)]
struct Slot {
    name: String,
    /// From the run's list (plain `cuda` nodes may take it), or added for a node pinned to a
    /// GPU outside the list.
    listed: bool,
    busy: bool,
}

#[derive(Debug, Default)]
struct State {
    /// The resolved list's origin; `None` until a plain `cuda` node first needs a GPU.
    source: Option<String>,
    /// Whether [`GpuPool::announcement`] has said what the list is.
    announced: bool,
    slots: Vec<Slot>,
}

/// The GPU slots of a run and who holds them. Cheap to clone (shared).
#[derive(Clone, Debug)]
pub struct GpuPool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    gpus: Gpus,
    cuda_visible: Option<String>,
    state: Mutex<State>,
    freed: Condvar,
}

/// A GPU slot held by one batch of nodes; freed when dropped.
#[derive(Debug)]
pub struct Lease {
    pool: GpuPool,
    slot: usize,
    name: String,
    source: String,
}

impl Lease {
    /// The GPU's name (`cuda:1`), what the stage gets as its device.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the run's GPU list came from (`PROBEX_DEVICES`, `CUDA_VISIBLE_DEVICES`, ...).
    pub fn source(&self) -> &str {
        &self.source
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = self.pool.lock();
        if let Some(s) = st.slots.get_mut(self.slot) {
            s.busy = false;
        }
        drop(st);
        self.pool.inner.freed.notify_all();
    }
}

impl GpuPool {
    /// A pool over `gpus`, reading `CUDA_VISIBLE_DEVICES` now.
    pub fn new(gpus: Gpus) -> Self {
        Self::with_visible(gpus, std::env::var("CUDA_VISIBLE_DEVICES").ok())
    }

    /// A pool over `gpus` with the given `CUDA_VISIBLE_DEVICES` (tests).
    pub fn with_visible(gpus: Gpus, cuda_visible: Option<String>) -> Self {
        GpuPool {
            inner: Arc::new(Inner {
                gpus,
                cuda_visible,
                state: Mutex::new(State::default()),
                freed: Condvar::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the slot table consistent (every change is one
        // assignment), so a poisoned lock is still usable.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Once the list is known, the first call says what it is (a line for the console, so a
    /// user sees where plain `cuda` nodes go); `None` before that and after.
    pub fn announcement(&self) -> Option<String> {
        let mut st = self.lock();
        let source = st.source.clone()?;
        if std::mem::replace(&mut st.announced, true) {
            return None;
        }
        let names: Vec<&str> = st
            .slots
            .iter()
            .filter(|s| s.listed)
            .map(|s| s.name.as_str())
            .collect();
        Some(format!(
            "GPUs for `cuda` nodes: {} (from {source})",
            names.join(", ")
        ))
    }

    /// Blocks until a slot `resource` may use is free and takes it: any listed GPU for
    /// [`Resource::AnyGpu`] (the first free one), the named one for
    /// [`Resource::Gpu`]. `None` for [`Resource::Cpu`].
    pub fn acquire(&self, resource: &Resource) -> Option<Lease> {
        let mut st = self.lock();
        match resource {
            Resource::Cpu => return None,
            Resource::AnyGpu if st.source.is_none() => {
                // Resolved under the lock: every other plain `cuda` node would wait for the
                // list anyway. Only now, so that a run with no such node never probes.
                let (list, source) = self.inner.gpus.resolve(self.inner.cuda_visible.as_deref());
                for name in list {
                    // A slot a pinned node made earlier is that GPU's listed slot.
                    match st.slots.iter_mut().find(|s| !s.listed && s.name == name) {
                        Some(s) => s.listed = true,
                        None => st.slots.push(Slot {
                            name,
                            listed: true,
                            busy: false,
                        }),
                    }
                }
                st.source = Some(source);
            }
            Resource::Gpu(name) if !st.slots.iter().any(|s| s.name == *name) => {
                st.slots.push(Slot {
                    name: name.clone(),
                    listed: false,
                    busy: false,
                });
            }
            _ => {}
        }
        let wants = |s: &Slot| match resource {
            Resource::AnyGpu => s.listed,
            Resource::Gpu(name) => s.name == *name,
            Resource::Cpu => false,
        };
        loop {
            if let Some(i) = st.slots.iter().position(|s| wants(s) && !s.busy) {
                st.slots[i].busy = true;
                return Some(Lease {
                    pool: self.clone(),
                    slot: i,
                    name: st.slots[i].name.clone(),
                    source: st
                        .source
                        .clone()
                        .unwrap_or_else(|| "the node's own device".to_string()),
                });
            }
            st = self.inner.freed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    fn gpus(list: &str) -> Gpus {
        Gpus::new(Some(list), None, None).unwrap()
    }

    #[test]
    fn lists_parse_and_bad_ones_say_where_they_came_from() {
        assert_eq!(
            parse_list("cuda:0, 1,cuda:3").unwrap(),
            ["cuda:0", "cuda:1", "cuda:3"]
        );
        let e = parse_list("cpu").unwrap_err();
        assert_eq!(e.item, "cpu");
        assert!(e.to_string().contains("`cpu` is not a GPU"), "{e}");
        assert!(parse_list("0,,1").is_err());
        assert!(parse_list("cuda").is_err());
        let e = Gpus::new(None, Some("cuda:x"), None).unwrap_err();
        assert!(matches!(&e, GpuListError::Env { list, .. } if list == "cuda:x"));
        let e = e.to_string();
        assert!(e.starts_with("PROBEX_DEVICES=cuda:x: `cuda:x`"), "{e}");
        let e = Gpus::new(Some("gpu0"), Some("0"), None).unwrap_err();
        assert!(matches!(&e, GpuListError::Flag { source, .. } if source.item == "gpu0"));
        let e = e.to_string();
        assert!(e.starts_with("--devices gpu0"), "{e}");
    }

    #[test]
    fn the_flag_wins_over_the_env_which_wins_over_cuda_visible_devices_and_the_probe() {
        fn two() -> Result<usize, GpuProbeError> {
            Ok(2)
        }
        fn broken() -> Result<usize, GpuProbeError> {
            Err("no driver".into())
        }
        let g = Gpus::new(Some("3"), Some("0,1"), Some(two)).unwrap();
        assert_eq!(
            g.resolve(Some("0")),
            (vec!["cuda:3".into()], "--devices".into())
        );
        let g = Gpus::new(None, Some("0,1"), Some(two)).unwrap();
        assert_eq!(g.resolve(Some("0")).0, ["cuda:0", "cuda:1"]);
        assert_eq!(g.resolve(None).1, "PROBEX_DEVICES");
        // CUDA renumbers what it shows: two visible GPUs are cuda:0 and cuda:1 here.
        let g = Gpus::new(None, Some(""), Some(two)).unwrap();
        assert_eq!(
            g.resolve(Some("4,GPU-8c2e,junk,6")),
            (
                vec!["cuda:0".into(), "cuda:1".into()],
                "CUDA_VISIBLE_DEVICES".into()
            )
        );
        assert_eq!(g.resolve(Some("-1")).0, ["cuda:0", "cuda:1"]);
        assert_eq!(g.resolve(None).1, "the devices CUDA reports");
        let g = Gpus::new(None, None, Some(broken)).unwrap();
        assert_eq!(
            g.resolve(None),
            (vec!["cuda:0".into()], "the default (no driver)".into())
        );
        assert_eq!(Gpus::default().resolve(None).0, ["cuda:0"]);
    }

    #[test]
    fn the_probe_runs_only_when_a_gpu_is_first_needed() {
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        fn counting() -> Result<usize, GpuProbeError> {
            CALLS.fetch_add(1, Ordering::SeqCst);
            Ok(3)
        }
        let pool = GpuPool::with_visible(Gpus::new(None, None, Some(counting)).unwrap(), None);
        assert!(pool.acquire(&Resource::Cpu).is_none());
        assert_eq!(CALLS.load(Ordering::SeqCst), 0);
        let a = pool.acquire(&Resource::AnyGpu).unwrap();
        let b = pool.acquire(&Resource::AnyGpu).unwrap();
        assert_eq!((a.name(), b.name()), ("cuda:0", "cuda:1"));
        assert_eq!(a.source(), "the devices CUDA reports");
        assert_eq!(CALLS.load(Ordering::SeqCst), 1);
        assert_eq!(
            pool.announcement().as_deref(),
            Some("GPUs for `cuda` nodes: cuda:0, cuda:1, cuda:2 (from the devices CUDA reports)")
        );
        assert_eq!(pool.announcement(), None, "said once");
    }

    #[test]
    fn held_gpus_are_not_handed_out_again_until_released() {
        let pool = GpuPool::with_visible(gpus("0,1"), None);
        let a = pool.acquire(&Resource::AnyGpu).unwrap();
        let b = pool.acquire(&Resource::AnyGpu).unwrap();
        assert_eq!((a.name(), b.name()), ("cuda:0", "cuda:1"));
        // A third waits until one is released, then gets that one.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            let p = pool.clone();
            s.spawn(move || {
                let c = p.acquire(&Resource::AnyGpu).unwrap();
                tx.send(c.name().to_string()).unwrap();
            });
            assert!(rx.recv_timeout(Duration::from_millis(150)).is_err());
            drop(b);
            assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), "cuda:1");
        });
        drop(a);
    }

    #[test]
    fn pinned_nodes_share_slots_with_pooled_ones_and_may_name_unlisted_gpus() {
        let pool = GpuPool::with_visible(gpus("0,1"), None);
        let pinned = pool.acquire(&Resource::Gpu("cuda:0".into())).unwrap();
        let any = pool.acquire(&Resource::AnyGpu).unwrap();
        assert_eq!(any.name(), "cuda:1", "cuda:0 is held by the pinned node");
        // A GPU outside the list gets a slot of its own, which plain `cuda` nodes never take.
        let other = pool.acquire(&Resource::Gpu("cuda:7".into())).unwrap();
        assert_eq!(other.name(), "cuda:7");
        drop(other);
        drop(pinned);
        let next = pool.acquire(&Resource::AnyGpu).unwrap();
        assert_eq!(next.name(), "cuda:0");
        drop((any, next));
    }

    #[test]
    fn a_node_pinned_before_the_list_is_known_holds_that_listed_gpu() {
        fn unreachable_probe() -> Result<usize, GpuProbeError> {
            Err("the probe ran".into())
        }
        let pool = GpuPool::with_visible(
            Gpus::new(None, Some("0,1"), Some(unreachable_probe)).unwrap(),
            None,
        );
        let pinned = pool.acquire(&Resource::Gpu("cuda:1".into())).unwrap();
        assert_eq!(pinned.source(), "the node's own device");
        assert_eq!(pool.announcement(), None, "no list was needed yet");
        let any = pool.acquire(&Resource::AnyGpu).unwrap();
        assert_eq!((any.name(), any.source()), ("cuda:0", "PROBEX_DEVICES"));
        drop(pinned);
        let again = pool.acquire(&Resource::AnyGpu).unwrap();
        assert_eq!(again.name(), "cuda:1", "one slot per listed GPU, not two");
        drop((any, again));
    }

    #[test]
    fn a_gpu_listed_twice_runs_two_nodes() {
        let pool = GpuPool::with_visible(gpus("0,0"), None);
        let a = pool.acquire(&Resource::AnyGpu).unwrap();
        let b = pool.acquire(&Resource::Gpu("cuda:0".into())).unwrap();
        assert_eq!((a.name(), b.name()), ("cuda:0", "cuda:0"));
    }
}
