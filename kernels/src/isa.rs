//! Instruction-set selection: which SIMD level a kernel call uses, what this CPU
//! supports (detected at run time, never at compile time), the `CARDINAL_ISA`
//! override, and the process-wide active choice.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use crate::KernelError;

/// An instruction-set level that every kernel can be run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust, the reference for every other level.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL/DQ with VNNI (`vpdpbusd`).
    Avx512,
    /// aarch64 Advanced SIMD.
    Neon,
}

/// The environment variable that forces an ISA.
pub const ISA_ENV: &str = "CARDINAL_ISA";

const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Neon];

impl Isa {
    /// Short lowercase name, as accepted by `CARDINAL_ISA`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
        }
    }

    /// Whether this CPU can run the kernels of this level.
    pub fn available(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => avx2_available(),
            Isa::Avx512 => avx512_available(),
            Isa::Neon => neon_available(),
        }
    }

    /// The fastest level this CPU supports.
    pub fn best() -> Isa {
        [Isa::Avx512, Isa::Avx2, Isa::Neon]
            .into_iter()
            .find(|i| i.available())
            .unwrap_or(Isa::Scalar)
    }

    /// Every level this CPU supports, scalar first.
    pub fn all_available() -> Vec<Isa> {
        ALL.into_iter().filter(|i| i.available()).collect()
    }

    /// `CARDINAL_ISA` if set (error if unknown or unsupported here), else [`Isa::best`].
    pub fn from_env() -> Result<Isa, KernelError> {
        match std::env::var(ISA_ENV) {
            Ok(v) => Isa::from_setting(&v),
            Err(std::env::VarError::NotPresent) => Ok(Isa::best()),
            Err(std::env::VarError::NotUnicode(v)) => Err(KernelError::UnknownIsa {
                value: v.to_string_lossy().into_owned(),
            }),
        }
    }

    /// Parse a setting like `CARDINAL_ISA`'s and check this CPU supports it.
    /// An empty (or blank) value means "choose the best".
    pub fn from_setting(value: &str) -> Result<Isa, KernelError> {
        if value.trim().is_empty() {
            return Ok(Isa::best());
        }
        let isa: Isa = value.parse()?;
        if isa.available() {
            Ok(isa)
        } else {
            Err(KernelError::IsaUnavailable {
                isa: isa.name(),
                available: Isa::all_available()
                    .iter()
                    .map(|i| i.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    }

    /// Panics with a clear message if this CPU cannot run `self`; kernels call it
    /// before entering `#[target_feature]` code.
    #[inline]
    pub(crate) fn checked(self) -> Isa {
        assert!(
            self.available(),
            "kernel called with ISA {} which this CPU does not support",
            self.name()
        );
        self
    }
}

impl FromStr for Isa {
    type Err = KernelError;

    /// Parse a name (case-insensitive, surrounding blanks ignored); `avx512-vnni`
    /// is accepted as a synonym of `avx512`. Does not check availability.
    fn from_str(s: &str) -> Result<Isa, KernelError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Ok(Isa::Scalar),
            "avx2" => Ok(Isa::Avx2),
            "avx512" | "avx512-vnni" => Ok(Isa::Avx512),
            "neon" => Ok(Isa::Neon),
            _ => Err(KernelError::UnknownIsa {
                value: s.to_string(),
            }),
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Isa::Avx512 => f.write_str("avx512-vnni"),
            other => f.write_str(other.name()),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_available() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn avx512_available() -> bool {
    avx2_available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_available() -> bool {
    false
}

#[cfg(target_arch = "aarch64")]
fn neon_available() -> bool {
    std::arch::is_aarch64_feature_detected!("neon")
}

#[cfg(not(target_arch = "aarch64"))]
fn neon_available() -> bool {
    false
}

static ACTIVE: OnceLock<Isa> = OnceLock::new();

/// Choose the process-wide ISA from `CARDINAL_ISA` (see [`Isa::from_env`]) once,
/// log it, and return it. Later calls return the first choice.
pub fn init_isa() -> Result<Isa, KernelError> {
    if let Some(isa) = ACTIVE.get() {
        return Ok(*isa);
    }
    let isa = Isa::from_env()?;
    let mut first = false;
    let chosen = *ACTIVE.get_or_init(|| {
        first = true;
        isa
    });
    if first {
        tracing::info!(isa = %chosen, available = ?Isa::all_available(), "cardinal-kernels ISA selected");
    }
    Ok(chosen)
}

/// The ISA chosen by [`init_isa`], or [`Isa::best`] if it was never called.
pub fn active_isa() -> Isa {
    ACTIVE.get().copied().unwrap_or_else(Isa::best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names() {
        for isa in ALL {
            assert_eq!(isa.name().parse::<Isa>().unwrap(), isa);
        }
        assert_eq!(" AVX512-VNNI ".parse::<Isa>().unwrap(), Isa::Avx512);
        let e = "sse9".parse::<Isa>().unwrap_err().to_string();
        assert!(
            e.contains("sse9") && e.contains("scalar, avx2, avx512, neon"),
            "{e}"
        );
    }

    #[test]
    fn best_is_available() {
        assert!(Isa::best().available());
        assert!(Isa::all_available().contains(&Isa::Scalar));
        assert!(Isa::all_available().contains(&Isa::best()));
    }
}
