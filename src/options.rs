//! Every `DRIFTWOOD_*` environment variable, read once, in one place.
//!
//! Flags are for what a user chooses per run; these variables are for where files live and for
//! switching an optimization off to compare against it. [`VARS`] lists them (it is printed at the
//! end of `driftwood --help`, and the README's table is checked against it); [`get`] parses the
//! environment on first use. `driftwood` checks the values at start ([`check`]) and refuses a
//! malformed one with exit status 2, naming the variable; library users who skip the check get the
//! default for a malformed value and a warning on stderr.

use std::path::PathBuf;
use std::sync::OnceLock;

/// One environment variable: its name, what it takes, its default, and what it does.
pub struct Var {
    pub name: &'static str,
    pub value: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

/// Every variable Driftwood reads.
pub const VARS: &[Var] = &[
    Var { name: "DRIFTWOOD_MODELS", value: "DIR", default: "~/.cache/driftwood/models", help: "where registry models are fetched to and looked for" },
    Var { name: "DRIFTWOOD_KERNEL_CACHE", value: "DIR", default: "$XDG_CACHE_HOME/driftwood/kernels", help: "where compiled CUDA kernels are cached" },
    Var { name: "DRIFTWOOD_CPU_ISA", value: "scalar|avx2|avx512", default: "the best this CPU has", help: "caps the SIMD level of the CPU kernels" },
    Var { name: "DRIFTWOOD_CUDA_GRAPHS", value: "0|1", default: "1", help: "replay single-token decode passes as captured CUDA graphs" },
    Var { name: "DRIFTWOOD_CUDA_PDL", value: "0|1", default: "1", help: "programmatic dependent launch between kernels (sm_90 and newer)" },
    Var { name: "DRIFTWOOD_CUDA_BLOCKS_PER_SM", value: "N", default: "4", help: "product blocks per multiprocessor (0: one per row group)" },
    Var { name: "DRIFTWOOD_CUDA_STAGE_Q8_COLS", value: "N", default: "0", help: "quantize activations in each product block for rows up to N wide" },
    Var { name: "DRIFTWOOD_CUDA_SLICE_CAP", value: "0|1", default: "1", help: "cap the K-slices of small products" },
    Var { name: "DRIFTWOOD_CUDA_DENSE", value: "0|1", default: "1", help: "F16/BF16 one-token products through dense_mv (0: the warp-per-row kernels)" },
    Var { name: "DRIFTWOOD_CUDA_DENSE_PER_SM", value: "N", default: "4", help: "blocks per SM of dense_mv at one chunk a row (capped at what fits)" },
    Var { name: "DRIFTWOOD_CUDA_TENSOR_PREFILL", value: "0|1", default: "1", help: "F16/BF16 prefill products on the tensor cores (0: f32 SGEMM)" },
];

/// The SIMD levels `DRIFTWOOD_CPU_ISA` names, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum IsaCap {
    Scalar,
    Avx2,
    Avx512,
}

/// Switches of the CUDA backend (defaults: everything on).
#[derive(Debug, Clone, PartialEq)]
pub struct CudaOptions {
    pub graphs: bool,
    pub pdl: bool,
    pub blocks_per_sm: usize,
    pub stage_q8_cols: usize,
    pub slice_cap: bool,
    pub dense: bool,
    /// `None`: the kernel's default, capped at occupancy.
    pub dense_per_sm: Option<usize>,
    pub tensor_prefill: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions { graphs: true, pdl: true, blocks_per_sm: 4, stage_q8_cols: 0, slice_cap: true, dense: true, dense_per_sm: None, tensor_prefill: true }
    }
}

/// The parsed environment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    pub models_dir: Option<PathBuf>,
    pub kernel_cache: Option<PathBuf>,
    pub cpu_isa: Option<IsaCap>,
    pub cuda: CudaOptions,
}

impl Options {
    /// Parses the variables `lookup` gives (the process environment in [`get`]): empty values are
    /// unset; the first malformed value is an error naming it.
    pub fn parse(lookup: impl Fn(&str) -> Option<String>) -> Result<Options, String> {
        let var = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let bad = |name: &str, v: &str, want: &str| format!("{name}={v:?} is not valid: expected {want}");
        let switch = |name: &str, default: bool| -> Result<bool, String> {
            match var(name).as_deref() {
                None => Ok(default),
                Some("0") => Ok(false),
                Some("1") => Ok(true),
                Some(v) => Err(bad(name, v, "0 or 1")),
            }
        };
        let count = |name: &str, default: usize| -> Result<usize, String> {
            match var(name) {
                None => Ok(default),
                Some(v) => v.parse::<usize>().ok().filter(|&n| n <= 1 << 16).ok_or_else(|| bad(name, &v, "a whole number up to 65536")),
            }
        };
        let cpu_isa = match var("DRIFTWOOD_CPU_ISA").as_deref() {
            None => None,
            Some("scalar") => Some(IsaCap::Scalar),
            Some("avx2") => Some(IsaCap::Avx2),
            Some("avx512" | "avx512-vnni") => Some(IsaCap::Avx512),
            Some(v) => return Err(bad("DRIFTWOOD_CPU_ISA", v, "scalar, avx2 or avx512")),
        };
        let d = CudaOptions::default();
        let dense_per_sm = count("DRIFTWOOD_CUDA_DENSE_PER_SM", 0)?;
        Ok(Options {
            models_dir: var("DRIFTWOOD_MODELS").map(PathBuf::from),
            kernel_cache: var("DRIFTWOOD_KERNEL_CACHE").map(PathBuf::from),
            cpu_isa,
            cuda: CudaOptions {
                graphs: switch("DRIFTWOOD_CUDA_GRAPHS", d.graphs)?,
                pdl: switch("DRIFTWOOD_CUDA_PDL", d.pdl)?,
                blocks_per_sm: count("DRIFTWOOD_CUDA_BLOCKS_PER_SM", d.blocks_per_sm)?,
                stage_q8_cols: count("DRIFTWOOD_CUDA_STAGE_Q8_COLS", d.stage_q8_cols)?,
                slice_cap: switch("DRIFTWOOD_CUDA_SLICE_CAP", d.slice_cap)?,
                dense: switch("DRIFTWOOD_CUDA_DENSE", d.dense)?,
                dense_per_sm: (dense_per_sm > 0).then_some(dense_per_sm),
                tensor_prefill: switch("DRIFTWOOD_CUDA_TENSOR_PREFILL", d.tensor_prefill)?,
            },
        })
    }

    fn from_env() -> Result<Options, String> {
        Options::parse(|k| std::env::var(k).ok())
    }
}

static OPTIONS: OnceLock<Options> = OnceLock::new();

/// The options of this process, parsed on first use.
pub fn get() -> &'static Options {
    OPTIONS.get_or_init(|| {
        Options::from_env().unwrap_or_else(|e| {
            eprintln!("driftwood: {e}; using the defaults");
            Options::default()
        })
    })
}

/// Parses the environment now: an error names the malformed variable (the CLI exits 2 with it).
pub fn check() -> Result<&'static Options, String> {
    if let Some(o) = OPTIONS.get() {
        return Ok(o);
    }
    let parsed = Options::from_env()?;
    Ok(OPTIONS.get_or_init(|| parsed))
}

/// The table for `--help`: one line per variable.
pub fn help_text() -> String {
    let mut s = String::from("Environment (for file locations, and for comparisons: switching an optimization off):\n");
    for v in VARS {
        s += &format!("  {}={}\n          {} (default: {})\n", v.name, v.value, v.help, v.default);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Options, String> {
        let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Options::parse(|k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn nothing_set_is_the_defaults() {
        assert_eq!(parse(&[]).unwrap(), Options::default());
        // Empty counts as unset.
        assert_eq!(parse(&[("DRIFTWOOD_CUDA_GRAPHS", ""), ("DRIFTWOOD_MODELS", "")]).unwrap(), Options::default());
    }

    #[test]
    fn values_are_parsed() {
        let o = parse(&[
            ("DRIFTWOOD_CUDA_GRAPHS", "0"),
            ("DRIFTWOOD_CUDA_BLOCKS_PER_SM", "0"),
            ("DRIFTWOOD_CUDA_DENSE_PER_SM", "3"),
            ("DRIFTWOOD_CPU_ISA", "avx2"),
            ("DRIFTWOOD_MODELS", "/m"),
        ])
        .unwrap();
        assert!(!o.cuda.graphs && o.cuda.pdl);
        assert_eq!((o.cuda.blocks_per_sm, o.cuda.dense_per_sm), (0, Some(3)));
        assert_eq!(o.cpu_isa, Some(IsaCap::Avx2));
        assert_eq!(o.models_dir, Some(PathBuf::from("/m")));
    }

    #[test]
    fn a_malformed_value_is_an_error_naming_the_variable() {
        for (k, v) in [
            ("DRIFTWOOD_CUDA_PDL", "yes"),
            ("DRIFTWOOD_CUDA_BLOCKS_PER_SM", "-1"),
            ("DRIFTWOOD_CUDA_STAGE_Q8_COLS", "99999999999"),
            ("DRIFTWOOD_CPU_ISA", "sse"),
        ] {
            let e = parse(&[(k, v)]).unwrap_err();
            assert!(e.starts_with(&format!("{k}=")), "{e}");
        }
    }

    /// Every variable the sources read is in the table, and the table is in the README.
    #[test]
    fn the_table_lists_every_variable_read_and_the_readme_lists_the_table() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
        for v in VARS {
            assert!(readme.contains(v.name), "README lacks {}", v.name);
            assert!(help_text().contains(v.name));
        }
        let mut stack = vec![std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                if path.extension().and_then(|e| e.to_str()) != Some("rs") || path.ends_with("options.rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(!text.contains("\"DRIFTWOOD_"), "{} names a DRIFTWOOD_ variable itself", path.display());
            }
        }
    }
}
