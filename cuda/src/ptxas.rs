//! `ptxas -v` resource reports: per kernel, registers, shared memory, stack frame and spills.

use crate::compile::{Arch, Compiled};
use crate::toolkit::Toolkit;
use crate::CudaError;
use std::process::Command;

/// One kernel's resources as `ptxas -v` reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// The kernel's (entry function's) name.
    pub kernel: String,
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory, bytes.
    pub shared: u32,
    /// Stack frame, bytes.
    pub stack: u32,
    /// Local-memory spill stores, bytes.
    pub spill_stores: u32,
    /// Local-memory spill loads, bytes.
    pub spill_loads: u32,
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let at = line.find(unit)?;
    line[..at].split_whitespace().last()?.parse().ok()
}

/// Parses `ptxas -v` output (its info lines) into one record per entry function.
pub fn parse(report: &str) -> Vec<Resources> {
    let mut out: Vec<Resources> = vec![];
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default();
            out.push(Resources {
                kernel: name.to_string(),
                ..Default::default()
            });
        } else if let Some(r) = out.last_mut() {
            if line.contains("stack frame") {
                r.stack = number_before(line, "bytes stack frame").unwrap_or(0);
                r.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                r.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                r.registers = number_before(line, "registers").unwrap_or(0);
                r.shared = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

/// Assembles `compiled` with `ptxas -v` for its architecture and returns the report.
pub fn resources(tk: &Toolkit, compiled: &Compiled) -> Result<Vec<Resources>, CudaError> {
    let ptxas = tk
        .ptxas
        .as_ref()
        .ok_or_else(|| CudaError::Tool(format!("ptxas not found under {}", tk.root.display())))?;
    let dir = std::env::temp_dir().join(format!("kiln-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| CudaError::Tool(e.to_string()))?;
    let ptx = dir.join(format!("{:032x}.ptx", compiled.key));
    let cubin = ptx.with_extension("cubin");
    std::fs::write(&ptx, &compiled.ptx).map_err(|e| CudaError::Tool(e.to_string()))?;
    let out = Command::new(ptxas)
        .arg("-v")
        .arg(format!("-arch={}", compiled.arch.name()))
        .arg(&ptx)
        .arg("-o")
        .arg(&cubin)
        .output()
        .map_err(|e| CudaError::Tool(format!("running {}: {e}", ptxas.display())))?;
    let _ = std::fs::remove_file(&ptx);
    let _ = std::fs::remove_file(&cubin);
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(CudaError::Tool(format!(
            "ptxas failed on {} for {}: {text}",
            compiled.name,
            compiled.arch.name()
        )));
    }
    Ok(parse(&text))
}

/// The architecture `ptxas` checks are run for (the sm_90).
pub const CHECK_ARCH: Arch = Arch::Sm90;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_info_lines() {
        let report = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'k1' for 'sm_90'\n\
ptxas info    : Function properties for k1\n\
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 168 registers, used 1 barriers, 34816 bytes smem, 400 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'k2' for 'sm_90'\n\
ptxas info    : Function properties for k2\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 20 registers, used 0 barriers, 380 bytes cmem[0]\n";
        let r = parse(report);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            Resources {
                kernel: "k1".into(),
                registers: 168,
                shared: 34816,
                stack: 8,
                spill_stores: 4,
                spill_loads: 12
            }
        );
        assert_eq!((r[1].registers, r[1].shared, r[1].spill_loads), (20, 0, 0));
    }
}
