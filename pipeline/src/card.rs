//! The emulated NorthPole card: its memory budget, compute peaks, power and
//! links ([`CardSpec`]), with defaults from `northpole-facts.md` §7, TOML
//! overrides and validation. Values no source states are marked
//! "assumption" here and in ARCHITECTURE.md.

use serde::{Deserialize, Serialize};

/// Errors in a card specification.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("card spec {field} = {value}: {rule}")]
    Invalid {
        field: &'static str,
        value: String,
        rule: &'static str,
    },
    #[error("card spec file {path}: {msg}")]
    File { path: String, msg: String },
}

/// Everything the emulator needs to know about one card.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CardSpec {
    /// Core memory for weights and KV cache, bytes (192 MiB: 256 cores × 768 KiB; S10).
    pub memory_bytes: u64,
    /// I/O framebuffer for activations, bytes (32 MB; S10/S11). Not used for weights or KV.
    pub framebuffer_bytes: u64,
    /// Cores per card (256; S10).
    pub cores: u32,
    /// Peak int8 ops/s (derived: 256 × 2048 × 381 MHz ≈ 200 TOPS).
    pub peak_ops_int8: f64,
    /// Peak int4 ops/s (derived ≈ 400 TOPS; S4 115 POPS / 288 cards).
    pub peak_ops_int4: f64,
    /// Peak int2 ops/s (derived ≈ 800 TOPS).
    pub peak_ops_int2: f64,
    /// On-chip memory bandwidth, bytes/s (derived: 3.7 PB/s / 288 = 12.85 TB/s).
    pub onchip_bandwidth: f64,
    /// Calibrated fixed cost per card per micro-batch pass, seconds (a = 5.75 µs; facts §6 fit).
    pub stage_fixed_seconds: f64,
    /// Calibrated cost per million parameters per micro-batch pass, seconds (b = 0.275 µs; facts §6 fit).
    pub stage_seconds_per_mparam: f64,
    /// Average power while serving, watts (42 W = 672 W / 16; S1).
    pub active_watts: f64,
    /// Idle power, watts (assumption: 15 W; not found in any source).
    pub idle_watts: f64,
    /// Maximum card power, watts (< 55 W; S7).
    pub max_watts: f64,
    /// PCIe hop latency inside a server, seconds (assumption: 2 µs, inside `a`).
    pub pcie_latency_seconds: f64,
    /// PCIe bandwidth per direction, bytes/s (assumption: 8 GB/s).
    pub pcie_bandwidth: f64,
    /// Extra latency when crossing servers, seconds (assumption: 5 µs).
    pub ethernet_latency_seconds: f64,
    /// Inter-server bandwidth, bytes/s (200 GbE = 25 GB/s; S6).
    pub ethernet_bandwidth: f64,
    /// Cards per 2U server (16; S1/S4).
    pub cards_per_server: u32,
    /// Host power per server, watts (assumption: 900 W; derived range 787–995 W).
    pub host_watts_per_server: f64,
}

impl Default for CardSpec {
    fn default() -> Self {
        CardSpec {
            memory_bytes: 192 * 1024 * 1024,
            framebuffer_bytes: 32_000_000,
            cores: 256,
            peak_ops_int8: 199.7e12,
            peak_ops_int4: 399.3e12,
            peak_ops_int2: 798.6e12,
            onchip_bandwidth: 12.85e12,
            stage_fixed_seconds: 5.75e-6,
            stage_seconds_per_mparam: 0.275e-6,
            active_watts: 42.0,
            idle_watts: 15.0,
            max_watts: 55.0,
            pcie_latency_seconds: 2e-6,
            pcie_bandwidth: 8e9,
            ethernet_latency_seconds: 5e-6,
            ethernet_bandwidth: 25e9,
            cards_per_server: 16,
            host_watts_per_server: 900.0,
        }
    }
}

impl CardSpec {
    /// Reads a TOML file of overrides (any subset of the fields).
    pub fn from_toml_file(path: &std::path::Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| SpecError::File {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        let spec: CardSpec = toml::from_str(&text).map_err(|e| SpecError::File {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Rejects impossible values.
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |field, value: String, rule| Err(SpecError::Invalid { field, value, rule });
        if self.memory_bytes == 0 {
            return bad(
                "memory_bytes",
                "0".into(),
                "a card needs memory for its weights",
            );
        }
        if self.cores == 0 {
            return bad("cores", "0".into(), "must be at least 1");
        }
        if self.cards_per_server == 0 {
            return bad("cards_per_server", "0".into(), "must be at least 1");
        }
        let positive = [
            ("peak_ops_int8", self.peak_ops_int8),
            ("peak_ops_int4", self.peak_ops_int4),
            ("peak_ops_int2", self.peak_ops_int2),
            ("onchip_bandwidth", self.onchip_bandwidth),
            ("pcie_bandwidth", self.pcie_bandwidth),
            ("ethernet_bandwidth", self.ethernet_bandwidth),
        ];
        for (field, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return bad(field, v.to_string(), "must be a finite positive number");
            }
        }
        let non_negative = [
            ("stage_fixed_seconds", self.stage_fixed_seconds),
            ("stage_seconds_per_mparam", self.stage_seconds_per_mparam),
            ("active_watts", self.active_watts),
            ("idle_watts", self.idle_watts),
            ("max_watts", self.max_watts),
            ("pcie_latency_seconds", self.pcie_latency_seconds),
            ("ethernet_latency_seconds", self.ethernet_latency_seconds),
            ("host_watts_per_server", self.host_watts_per_server),
        ];
        for (field, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                return bad(field, v.to_string(), "must be a finite number >= 0");
            }
        }
        if self.idle_watts > self.active_watts {
            return bad(
                "idle_watts",
                self.idle_watts.to_string(),
                "must not exceed active_watts",
            );
        }
        if self.active_watts > self.max_watts {
            return bad(
                "active_watts",
                self.active_watts.to_string(),
                "must not exceed max_watts",
            );
        }
        Ok(())
    }

    /// Modeled seconds for one micro-batch pass of a card holding `params` parameters.
    pub fn stage_seconds(&self, params: u64) -> f64 {
        self.stage_fixed_seconds + self.stage_seconds_per_mparam * params as f64 / 1e6
    }

    /// Modeled seconds to move `bytes` from card `from` to card `from + 1`.
    pub fn link_seconds(&self, from: usize, bytes: u64) -> f64 {
        let per_server = self.cards_per_server as usize;
        if (from + 1).is_multiple_of(per_server) {
            self.ethernet_latency_seconds + bytes as f64 / self.ethernet_bandwidth
        } else {
            bytes as f64 / self.pcie_bandwidth
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_named() {
        CardSpec::default().validate().unwrap();
        let s = CardSpec {
            memory_bytes: 0,
            ..Default::default()
        };
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("memory_bytes")
        );
        let s = CardSpec {
            idle_watts: -1.0,
            ..Default::default()
        };
        assert!(s.validate().unwrap_err().to_string().contains("idle_watts"));
    }

    #[test]
    fn calibrated_stage_matches_the_facts_sheet() {
        // 3B layer of 218.1 M parameters: 5.75 + 0.275 * 218.1 = 65.73 µs.
        let t = CardSpec::default().stage_seconds(218_100_000);
        assert!((t * 1e6 - 65.7275).abs() < 0.001, "{t}");
    }
}
