//! Which SIMD level the CPU kernels run at: detected once, capped by the user's options.

use std::sync::OnceLock;

/// The SIMD level the kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust.
    Scalar,
    /// AVX2 + FMA + F16C.
    Avx2,
    /// AVX-512 F/BW/VL + VNNI (plus AVX2, FMA, F16C).
    Avx512,
}

impl Isa {
    /// Parses the names `DRIFTWOOD_CPU_ISA` and `--device cpu:ISA` take.
    pub fn parse(s: &str) -> Option<Isa> {
        match s {
            "scalar" => Some(Isa::Scalar),
            "avx2" => Some(Isa::Avx2),
            "avx512" | "avx512-vnni" => Some(Isa::Avx512),
            _ => None,
        }
    }

    /// The best level this CPU has.
    pub fn best() -> Isa {
        detect_isa()
    }

    /// Short name for benchmark reports.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512-vnni",
        }
    }
}

/// The level the kernels use, detected once: the best the CPU has (AVX-512 VNNI on Zen 4,
/// where it decodes a few percent faster than AVX2 and is as accurate);
/// `DRIFTWOOD_CPU_ISA=scalar|avx2|avx512` caps it, for comparisons. Every level gives a prefill
/// tile bit for bit what one-token decode gives (see
/// `avx512_q4_matches_scalar_on_outlier_activations`). Never above what the CPU has.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let detected = detect_isa();
        use crate::options::IsaCap;
        let wanted = match crate::options::get().cpu_isa {
            Some(IsaCap::Scalar) => Isa::Scalar,
            Some(IsaCap::Avx2) => Isa::Avx2,
            Some(IsaCap::Avx512) | None => Isa::Avx512,
        };
        detected.min(wanted)
    })
}

pub(super) fn detect_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        if avx512 {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

/// Levels usable on this machine, lowest first (for tests comparing kernels).
#[cfg(test)]
pub(super) fn available_isas() -> Vec<Isa> {
    let best = detect_isa();
    [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|&i| i <= best).collect()
}
