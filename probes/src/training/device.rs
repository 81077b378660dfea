//! Device selection: `cpu` (Burn's flex backend), `cuda` / `cuda:N` (Burn's CUDA backend,
//! compiled with the cargo feature `cuda`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a device cannot be named or used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// `cuda:N` where N is not a number.
    #[error("device `{spec}`: `{number}` is not a device number (expected cuda:0, cuda:1, ...)")]
    BadNumber {
        /// The whole device name as written.
        spec: String,
        /// The part after `cuda:`.
        number: String,
    },
    /// A name that is no device.
    #[error("unknown device `{0}` (expected `cpu`, `cuda` or `cuda:N`)")]
    Unknown(String),
    /// A CUDA device was asked for in a build without the `cuda` feature.
    #[error(
        "device cuda:{0} was requested, but this probex was built without CUDA support; \
         rebuild with `--features cuda` or use device = \"cpu\""
    )]
    NoCudaBuild(usize),
    /// The test computation on the device ran but returned the wrong value.
    #[error("cuda:{device}: a test computation on the device returned {returned} instead of 3")]
    WrongAnswer {
        /// The device number.
        device: usize,
        /// What it returned instead (debug form).
        returned: String,
    },
    /// The CUDA backend panicked on the device (no driver, no device).
    #[error(
        "cuda:{device} is not usable: {why}. Check that an NVIDIA driver (libcuda.so), \
         libnvrtc.so and the CUDA headers (CUDA_PATH) are installed and that device {device} \
         exists, or use device = \"cpu\""
    )]
    Unusable {
        /// The device number.
        device: usize,
        /// The backend's panic message.
        why: String,
    },
    /// The driver could not count its devices.
    #[error("the CUDA driver could not count its devices")]
    CannotCount,
    /// The rayon pool for the training threads could not start.
    #[error("cannot start {threads} training threads: {reason}")]
    Threads {
        /// How many threads were asked for.
        threads: usize,
        /// Rayon's error, as text (its error type is not `Clone`).
        reason: String,
    },
}

/// Where a training runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum DeviceSpec {
    /// The CPU (flex backend, rayon threads).
    #[default]
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        let s = s.trim();
        if s == "cpu" {
            return Ok(DeviceSpec::Cpu);
        }
        if s == "cuda" {
            return Ok(DeviceSpec::Cuda(0));
        }
        if let Some(n) = s.strip_prefix("cuda:") {
            return n
                .parse()
                .map(DeviceSpec::Cuda)
                .map_err(|_| DeviceError::BadNumber {
                    spec: s.to_owned(),
                    number: n.to_owned(),
                });
        }
        Err(DeviceError::Unknown(s.to_owned()))
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl DeviceSpec {
    /// Checks that the device can run Burn here: always true for the CPU; for CUDA, that this
    /// build has the `cuda` feature and that a tiny computation on the device succeeds (the
    /// CUDA backend panics without a driver; the panic is caught and turned into this error).
    /// The probe runs once per device and process.
    pub fn check(&self) -> Result<(), DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(()),
            DeviceSpec::Cuda(n) => cuda_check(*n),
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_check(n: usize) -> Result<(), DeviceError> {
    Err(DeviceError::NoCudaBuild(n))
}

#[cfg(feature = "cuda")]
fn cuda_check(n: usize) -> Result<(), DeviceError> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    static PROBED: OnceLock<Mutex<HashMap<usize, Result<(), DeviceError>>>> = OnceLock::new();
    let cache = PROBED.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    cache.entry(n).or_insert_with(|| probe_cuda(n)).clone()
}

#[cfg(feature = "cuda")]
fn probe_cuda(n: usize) -> Result<(), DeviceError> {
    use burn::backend::Cuda;
    use burn::backend::cuda::CudaDevice;
    use burn::tensor::{Tensor, TensorData};

    // The CUDA backend reports a missing driver or device by panicking (on a worker thread,
    // then again on this one); keep the default hook from printing a trace for that.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(|| {
        let device = CudaDevice::new(n);
        let t = Tensor::<Cuda, 1>::from_data(TensorData::new(vec![1.0f32, 2.0], [2]), &device);
        t.sum()
            .into_data()
            .into_vec::<f32>()
            .map(|v| v.first().copied())
    });
    std::panic::set_hook(hook);
    match result {
        Ok(Ok(Some(s))) if s == 3.0 => Ok(()),
        Ok(other) => Err(DeviceError::WrongAnswer {
            device: n,
            returned: format!("{other:?}"),
        }),
        Err(payload) => {
            let why = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown error".into());
            Err(DeviceError::Unusable { device: n, why })
        }
    }
}

/// How many CUDA devices this process can use (the engine's GPU probe, for spreading plain
/// `cuda` nodes over them), or why it cannot tell: a build without the `cuda` feature, or no
/// usable `cuda:0` (no driver, no device).
pub fn cuda_device_count() -> Result<usize, DeviceError> {
    DeviceSpec::Cuda(0).check()?;
    cuda_count()
}

#[cfg(not(feature = "cuda"))]
fn cuda_count() -> Result<usize, DeviceError> {
    Err(DeviceError::NoCudaBuild(0))
}

#[cfg(feature = "cuda")]
fn cuda_count() -> Result<usize, DeviceError> {
    use burn::tensor::backend::Backend;
    // `cuda:0` answered the probe above, so the client this makes exists; the count comes
    // from the driver (cuDeviceGetCount), which sees only CUDA_VISIBLE_DEVICES when set.
    // Caught all the same: the backend reports trouble by panicking.
    std::panic::catch_unwind(|| <burn::backend::Cuda as Backend>::device_count(0))
        .map_err(|_| DeviceError::CannotCount)
}

/// Runs `f` on a dedicated rayon pool of `threads` threads (0: on the caller's pool). Flex's
/// GEMMs and element-wise kernels use the current rayon pool, so this bounds the training's
/// CPU use; several trainings can run side by side, each in its own pool.
pub fn with_threads<T: Send>(
    threads: usize,
    f: impl FnOnce() -> T + Send,
) -> Result<T, DeviceError> {
    if threads == 0 {
        return Ok(f());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("probex-train-{i}"))
        .build()
        .map_err(|e| DeviceError::Threads {
            threads,
            reason: e.to_string(),
        })?;
    Ok(pool.install(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        let e = "gpu".parse::<DeviceSpec>().unwrap_err();
        assert_eq!(e, DeviceError::Unknown("gpu".into()));
        assert!(e.to_string().contains("cuda:N"), "{e}");
        let e = "cuda:x".parse::<DeviceSpec>().unwrap_err();
        assert!(
            matches!(&e, DeviceError::BadNumber { number, .. } if number == "x"),
            "{e:?}"
        );
        assert!(e.to_string().contains("device number"), "{e}");
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_is_a_clear_error() {
        let e = DeviceSpec::Cuda(0).check().unwrap_err();
        assert_eq!(e, DeviceError::NoCudaBuild(0));
        assert!(e.to_string().contains("--features cuda"), "{e}");
        assert!(DeviceSpec::Cpu.check().is_ok());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn counting_gpus_without_the_feature_says_why_it_cannot() {
        let e = cuda_device_count().unwrap_err();
        assert!(e.to_string().contains("--features cuda"), "{e}");
    }

    #[test]
    fn pool_has_the_requested_threads() {
        assert_eq!(with_threads(3, rayon::current_num_threads).unwrap(), 3);
    }
}
