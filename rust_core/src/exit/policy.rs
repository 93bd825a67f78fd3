//! `ExitPolicy`: the validated parameters of the exit state machine, each with an
//! explicit unit (see `docs/exit-rules.md`, "Units").
//!
//! | unit   | meaning                                                          |
//! |--------|------------------------------------------------------------------|
//! | pct    | fraction of the entry price (`0.015` = 1.5 %)                    |
//! | margin | fraction of the position's margin = pct × leverage               |
//! | atr    | multiple of the symbol's current ATR                             |
//! | R      | multiple of the initial stop distance (after quantization)       |
//! | ms     | milliseconds of event time (the mark message's `E`)              |
//!
//! Invariants once built (by [`ExitPolicy::new`], serde or a preset): every field
//! is finite and inside its range, the ladder is strictly increasing, its
//! fractions are positive and sum to at most 1 (checked exactly, in decimal), and
//! at most one trailing distance is set. The decimal forms of the percentages
//! are computed once here so the per-tick path never converts floats.
//!
//! Sizing is not an exit parameter: the "challenge" profile's 1R = 1.5 % of
//! equity is how the daemon sizes a position (quantity = equity × risk /
//! stop distance, see `plan_entry`); the policy only fixes the stop distance.

use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::fixed::{decimal_from_f64, Decimal};

/// Unit of the ladder levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum LadderUnit {
    /// Level `at` is a multiple of R: price = entry ± at × R.
    #[default]
    #[serde(rename = "R")]
    R,
    /// Level `at` is a fraction of the entry price: price = entry × (1 ± at).
    #[serde(rename = "pct")]
    Pct,
}

impl LadderUnit {
    /// Returns the unit as written in TOML and Python (`"R"` or `"pct"`).
    pub fn as_str(self) -> &'static str {
        match self {
            LadderUnit::R => "R",
            LadderUnit::Pct => "pct",
        }
    }

    /// Parses `"R"` / `"pct"` (case-insensitive).
    ///
    /// # Errors
    /// `CoreError::Policy` naming `ladder_unit` for any other text.
    pub fn parse(text: &str) -> Result<Self, CoreError> {
        match text.to_ascii_lowercase().as_str() {
            "r" => Ok(LadderUnit::R),
            "pct" | "percent" => Ok(LadderUnit::Pct),
            _ => Err(policy_err("ladder_unit", text, "must be \"R\" or \"pct\"")),
        }
    }
}

/// One take-profit level: where (`at`, in the ladder's unit) and how much
/// (`fraction` of the ORIGINAL size).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LadderLevel {
    /// Distance from entry in the ladder unit (R multiple or pct of entry).
    pub at: f64,
    /// Fraction of the original position size closed at this level.
    pub fraction: f64,
}

impl LadderLevel {
    /// A ladder from `(at, fraction)` pairs, in order.
    pub fn ladder(levels: &[(f64, f64)]) -> Vec<Self> {
        levels
            .iter()
            .map(|&(at, fraction)| Self { at, fraction })
            .collect()
    }
}

/// The plain, serializable fields of a policy. Build an [`ExitPolicy`] from it
/// with [`ExitPolicy::new`], which validates every field.
///
/// Every optional field defaults to `None` (off), so a TOML dump, which cannot
/// write `None`, reads back to the same policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Initial stop distance in ATR multiples; `None`: always `fallback_stop_pct`.
    pub stop_atr: Option<f64>,
    /// Stop distance (pct of entry) while ATR is not ready, or without `stop_atr`.
    pub fallback_stop_pct: f64,
    /// Floor of the initial stop distance (pct of entry).
    pub min_stop_pct: f64,
    /// Cap of the initial stop distance (pct of entry).
    pub max_stop_pct: f64,
    /// Cap of the loss at the stop as a fraction of margin (pct = margin / leverage).
    pub max_margin_loss: Option<f64>,
    /// Keep the stop this far inside the liquidation price (pct of entry).
    pub liq_buffer_pct: f64,
    /// Smallest stop distance (pct of entry) a position may be given; below it the
    /// position is over-leveraged for its risk budget. `None`: `min_stop_pct`.
    pub min_allowed_stop_pct: Option<f64>,
    /// Take-profit levels, strictly increasing.
    pub ladder: Vec<LadderLevel>,
    /// Unit of `ladder[i].at`.
    pub ladder_unit: LadderUnit,
    /// Ladder stretch per unit of confidence above 0.5 (0 disables stretching).
    pub confidence_scale: f64,
    /// Lower clamp of the ladder stretch factor.
    pub m_min: f64,
    /// Upper clamp of the ladder stretch factor.
    pub m_max: f64,
    /// After this ladder level (1-based) fills, move the stop to breakeven.
    pub breakeven_after_level: Option<u32>,
    /// Extra breakeven buffer (pct of entry) on top of the round-trip fees.
    pub breakeven_extra_pct: f64,
    /// Taker fee rate (fraction of notional); breakeven adds it twice.
    pub taker_fee: f64,
    /// After level n ≥ 2 fills, move the stop to level n − 1's price.
    pub ratchet_to_previous_level: bool,
    /// Trailing distance in ATR multiples of the current ATR.
    pub trail_atr: Option<f64>,
    /// Trailing distance as a fraction of the best mark price (callback rate).
    pub trail_pct: Option<f64>,
    /// Trailing activates once the best mark is this many R in profit.
    pub trail_activate_r: Option<f64>,
    /// Trailing activates once the best mark is this pct of entry in profit.
    pub trail_activate_pct: Option<f64>,
    /// Trailing activates once this ladder level (1-based) has filled.
    pub trail_after_level: Option<u32>,
    /// Time stop: close after this much event time since the position opened (ms).
    pub max_hold_ms: Option<i64>,
    /// With a time stop: only close while the best profit stayed below this many R.
    pub time_stop_unless_r: Option<f64>,
    /// Wilder ATR period in bars.
    pub atr_period: u32,
    /// Bar interval for the ATR, e.g. `"1m"`, `"15m"`, `"1h"`.
    pub atr_interval: String,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            stop_atr: None,
            fallback_stop_pct: 0.01,
            min_stop_pct: 0.003,
            max_stop_pct: 0.05,
            max_margin_loss: None,
            liq_buffer_pct: 0.01,
            min_allowed_stop_pct: None,
            ladder: Vec::new(),
            ladder_unit: LadderUnit::R,
            confidence_scale: 0.0,
            m_min: 1.0,
            m_max: 1.0,
            breakeven_after_level: None,
            breakeven_extra_pct: 0.0,
            taker_fee: 0.0005,
            ratchet_to_previous_level: false,
            trail_atr: None,
            trail_pct: None,
            trail_activate_r: None,
            trail_activate_pct: None,
            trail_after_level: None,
            max_hold_ms: None,
            time_stop_unless_r: None,
            atr_period: 14,
            atr_interval: "1m".to_owned(),
        }
    }
}

/// Decimal forms computed once at validation.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Derived {
    pub fallback_stop_pct: Decimal,
    pub min_stop_pct: Decimal,
    pub max_stop_pct: Decimal,
    pub max_margin_loss: Option<Decimal>,
    pub liq_buffer_pct: Decimal,
    pub min_allowed_stop_pct: Decimal,
    pub cum_fractions: Vec<Decimal>,
    pub breakeven_pct: Decimal,
    pub trail_pct: Option<Decimal>,
    pub trail_activate_pct: Option<Decimal>,
    pub interval_ms: i64,
    // The float multipliers as decimals, converted once here rather than at every open.
    pub stop_atr: Option<Decimal>,
    pub trail_activate_r: Option<Decimal>,
    pub time_stop_unless_r: Option<Decimal>,
    /// `ladder[i].at` (the level distance without a confidence stretch).
    pub ladder_at: Vec<Decimal>,
}

/// A validated exit policy. See the module header for units and invariants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "PolicyConfig", into = "PolicyConfig")]
pub struct ExitPolicy {
    config: PolicyConfig,
    derived: Derived,
}

impl TryFrom<PolicyConfig> for ExitPolicy {
    type Error = CoreError;
    fn try_from(config: PolicyConfig) -> Result<Self, CoreError> {
        ExitPolicy::new(config)
    }
}

impl From<ExitPolicy> for PolicyConfig {
    fn from(policy: ExitPolicy) -> Self {
        policy.config
    }
}

#[allow(clippy::needless_pass_by_value)] // call sites pass numbers and strings alike
pub(crate) fn policy_err(field: &str, value: impl ToString, rule: &str) -> CoreError {
    CoreError::Policy {
        field: field.to_owned(),
        value: value.to_string(),
        rule: rule.to_owned(),
    }
}

/// Converts a finite float to the decimal its shortest representation shows
/// (`0.3` -> `0.3`, not the binary expansion), so fractions such as 0.3 + 0.3 +
/// 0.4 sum to exactly 1.
pub(crate) fn decimal_of(field: &str, value: f64) -> Result<Decimal, CoreError> {
    decimal_from_f64(field, value).map_err(|_| {
        policy_err(
            field,
            value,
            "must be a finite number that fits a 28-digit decimal",
        )
    })
}

fn check_range(
    field: &str,
    value: f64,
    lo: f64,
    lo_open: bool,
    hi: f64,
    hi_open: bool,
) -> Result<(), CoreError> {
    let above = if lo_open { value > lo } else { value >= lo };
    let below = if hi_open { value < hi } else { value <= hi };
    if !value.is_finite() || !above || !below {
        let rule = format!(
            "must be in {}{lo}, {hi}{}",
            if lo_open { '(' } else { '[' },
            if hi_open { ')' } else { ']' }
        );
        return Err(policy_err(field, value, &rule));
    }
    Ok(())
}

fn check_opt(
    field: &str,
    value: Option<f64>,
    lo: f64,
    lo_open: bool,
    hi: f64,
    hi_open: bool,
) -> Result<(), CoreError> {
    value.map_or(Ok(()), |v| check_range(field, v, lo, lo_open, hi, hi_open))
}

/// Parses a Binance-style interval (`1s`, `1m`, `3m`, `1h`, `1d`, …) into ms.
///
/// # Errors
/// `CoreError::Policy` naming `atr_interval` when the text is not `<n><s|m|h|d|w>`.
pub fn parse_interval_ms(text: &str) -> Result<i64, CoreError> {
    let bad = || {
        policy_err(
            "atr_interval",
            text,
            "must be <count><s|m|h|d|w>, e.g. \"1m\"",
        )
    };
    let Some((unit_at, _)) = text.char_indices().last() else {
        return Err(bad());
    };
    let (digits, unit) = text.split_at(unit_at);
    let count: i64 = digits.parse().map_err(|_| bad())?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 604_800_000,
        _ => return Err(bad()),
    };
    if !(1..=1_000).contains(&count) {
        return Err(bad());
    }
    Ok(count * unit_ms)
}

impl ExitPolicy {
    /// Validates `config` and builds the policy.
    ///
    /// # Errors
    /// `CoreError::Policy { field, value, rule }` for the first field out of range.
    #[allow(clippy::too_many_lines)] // one check per field, in field order
    pub fn new(config: PolicyConfig) -> Result<Self, CoreError> {
        let c = &config;
        check_opt("stop_atr", c.stop_atr, 0.0, true, 100.0, false)?;
        check_range(
            "fallback_stop_pct",
            c.fallback_stop_pct,
            0.0,
            true,
            1.0,
            true,
        )?;
        check_range("min_stop_pct", c.min_stop_pct, 0.0, true, 1.0, true)?;
        check_range("max_stop_pct", c.max_stop_pct, 0.0, true, 1.0, true)?;
        if c.max_stop_pct < c.min_stop_pct {
            return Err(policy_err(
                "max_stop_pct",
                c.max_stop_pct,
                &format!("must be >= min_stop_pct {}", c.min_stop_pct),
            ));
        }
        check_opt("max_margin_loss", c.max_margin_loss, 0.0, true, 1.0, false)?;
        check_range("liq_buffer_pct", c.liq_buffer_pct, 0.0, false, 1.0, true)?;
        check_opt(
            "min_allowed_stop_pct",
            c.min_allowed_stop_pct,
            0.0,
            true,
            1.0,
            true,
        )?;
        if c.ladder.len() > 32 {
            return Err(policy_err(
                "ladder",
                c.ladder.len(),
                "must have at most 32 levels",
            ));
        }
        let mut cum = Decimal::ZERO;
        let mut cum_fractions = Vec::with_capacity(c.ladder.len());
        let mut previous_at = 0.0_f64;
        for (i, level) in c.ladder.iter().enumerate() {
            let at_field = format!("ladder[{i}].at");
            let fraction_field = format!("ladder[{i}].fraction");
            let hi_at = if c.ladder_unit == LadderUnit::Pct {
                10.0
            } else {
                1_000.0
            };
            check_range(&at_field, level.at, 0.0, true, hi_at, false)?;
            if i > 0 && level.at <= previous_at {
                return Err(policy_err(
                    &at_field,
                    level.at,
                    &format!("must be above ladder[{}].at {previous_at}", i - 1),
                ));
            }
            previous_at = level.at;
            check_range(&fraction_field, level.fraction, 0.0, true, 1.0, false)?;
            cum += decimal_of(&fraction_field, level.fraction)?;
            if cum > Decimal::ONE {
                return Err(policy_err(
                    &fraction_field,
                    level.fraction,
                    &format!("makes the ladder fractions sum to {cum}, above 1"),
                ));
            }
            cum_fractions.push(cum);
        }
        check_range(
            "confidence_scale",
            c.confidence_scale,
            0.0,
            false,
            100.0,
            false,
        )?;
        check_range("m_min", c.m_min, 0.0, true, 100.0, false)?;
        check_range("m_max", c.m_max, 0.0, true, 100.0, false)?;
        if c.m_max < c.m_min {
            return Err(policy_err(
                "m_max",
                c.m_max,
                &format!("must be >= m_min {}", c.m_min),
            ));
        }
        let levels = c.ladder.len() as u32;
        for (field, level) in [
            ("breakeven_after_level", c.breakeven_after_level),
            ("trail_after_level", c.trail_after_level),
        ] {
            if let Some(n) = level {
                if n == 0 || n > levels {
                    return Err(policy_err(
                        field,
                        n,
                        &format!("must name a ladder level in 1..={levels}"),
                    ));
                }
            }
        }
        check_range(
            "breakeven_extra_pct",
            c.breakeven_extra_pct,
            0.0,
            false,
            1.0,
            true,
        )?;
        check_range("taker_fee", c.taker_fee, 0.0, false, 0.1, false)?;
        check_opt("trail_atr", c.trail_atr, 0.0, true, 100.0, false)?;
        check_opt("trail_pct", c.trail_pct, 0.0, true, 1.0, true)?;
        if c.trail_atr.is_some() && c.trail_pct.is_some() {
            return Err(policy_err(
                "trail_pct",
                c.trail_pct.unwrap_or_default(),
                "must not be set together with trail_atr",
            ));
        }
        check_opt(
            "trail_activate_r",
            c.trail_activate_r,
            0.0,
            false,
            1_000.0,
            false,
        )?;
        check_opt(
            "trail_activate_pct",
            c.trail_activate_pct,
            0.0,
            false,
            10.0,
            false,
        )?;
        let trailing = c.trail_atr.is_some() || c.trail_pct.is_some();
        for (field, set) in [
            ("trail_activate_r", c.trail_activate_r.is_some()),
            ("trail_activate_pct", c.trail_activate_pct.is_some()),
            ("trail_after_level", c.trail_after_level.is_some()),
        ] {
            if set && !trailing {
                return Err(policy_err(field, "set", "needs trail_atr or trail_pct"));
            }
        }
        if let Some(ms) = c.max_hold_ms {
            if ms <= 0 {
                return Err(policy_err("max_hold_ms", ms, "must be > 0"));
            }
        }
        check_opt(
            "time_stop_unless_r",
            c.time_stop_unless_r,
            0.0,
            true,
            1_000.0,
            false,
        )?;
        if c.time_stop_unless_r.is_some() && c.max_hold_ms.is_none() {
            return Err(policy_err(
                "time_stop_unless_r",
                c.time_stop_unless_r.unwrap_or_default(),
                "needs max_hold_ms",
            ));
        }
        if !(1..=1_000).contains(&c.atr_period) {
            return Err(policy_err(
                "atr_period",
                c.atr_period,
                "must be in [1, 1000]",
            ));
        }
        let interval_ms = parse_interval_ms(&c.atr_interval)?;
        let taker = decimal_of("taker_fee", c.taker_fee)?;
        let derived = Derived {
            fallback_stop_pct: decimal_of("fallback_stop_pct", c.fallback_stop_pct)?,
            min_stop_pct: decimal_of("min_stop_pct", c.min_stop_pct)?,
            max_stop_pct: decimal_of("max_stop_pct", c.max_stop_pct)?,
            max_margin_loss: c
                .max_margin_loss
                .map(|v| decimal_of("max_margin_loss", v))
                .transpose()?,
            liq_buffer_pct: decimal_of("liq_buffer_pct", c.liq_buffer_pct)?,
            min_allowed_stop_pct: decimal_of(
                "min_allowed_stop_pct",
                c.min_allowed_stop_pct.unwrap_or(c.min_stop_pct),
            )?,
            cum_fractions,
            breakeven_pct: taker * Decimal::TWO
                + decimal_of("breakeven_extra_pct", c.breakeven_extra_pct)?,
            trail_pct: c
                .trail_pct
                .map(|v| decimal_of("trail_pct", v))
                .transpose()?,
            trail_activate_pct: c
                .trail_activate_pct
                .map(|v| decimal_of("trail_activate_pct", v))
                .transpose()?,
            interval_ms,
            stop_atr: c.stop_atr.map(|v| decimal_of("stop_atr", v)).transpose()?,
            trail_activate_r: c
                .trail_activate_r
                .map(|v| decimal_of("trail_activate_r", v))
                .transpose()?,
            time_stop_unless_r: c
                .time_stop_unless_r
                .map(|v| decimal_of("time_stop_unless_r", v))
                .transpose()?,
            ladder_at: c
                .ladder
                .iter()
                .enumerate()
                .map(|(i, level)| decimal_of(&format!("ladder[{i}].at"), level.at))
                .collect::<Result<_, _>>()?,
        };
        Ok(Self { config, derived })
    }

    /// Returns a named preset: `"standard"` or `"challenge"` (see [`PolicyConfig`]
    /// docs in `exit-rules.md`).
    ///
    /// - standard: stop at 10 % of margin (10 %/leverage of price, at most 10 % of
    ///   price), ladder +1.5 / +2.5 / +4.0 % of price closing 30 / 30 / 20 % of the
    ///   original size, breakeven (+ round-trip fees) after the first level, and a
    ///   1.5 % trailing stop behind the best mark from +4 % on the 20 % runner.
    /// - challenge: 2 × ATR stop kept 1 % inside liquidation, 30 % at +1R, then
    ///   breakeven plus round-trip fees and a 2 × ATR trail, and a 2 h time stop
    ///   unless +1R was reached. 1R = 1.5 % of equity and the 1.5R cap are sizing
    ///   (the daemon sizes the position so that the stop loses 1R).
    ///
    /// # Errors
    /// `CoreError::Policy` naming `preset` for an unknown name.
    pub fn preset(name: &str) -> Result<Self, CoreError> {
        let config = match name {
            "standard" => PolicyConfig {
                stop_atr: None,
                fallback_stop_pct: 0.10,
                min_stop_pct: 0.001,
                max_stop_pct: 0.10,
                max_margin_loss: Some(0.10),
                liq_buffer_pct: 0.01,
                min_allowed_stop_pct: None,
                ladder: LadderLevel::ladder(&[(0.015, 0.3), (0.025, 0.3), (0.04, 0.2)]),
                ladder_unit: LadderUnit::Pct,
                breakeven_after_level: Some(1),
                taker_fee: 0.0005,
                trail_pct: Some(0.015),
                trail_activate_pct: Some(0.04),
                ..PolicyConfig::default()
            },
            "challenge" => PolicyConfig {
                stop_atr: Some(2.0),
                fallback_stop_pct: 0.01,
                min_stop_pct: 0.002,
                max_stop_pct: 0.05,
                max_margin_loss: None,
                liq_buffer_pct: 0.01,
                ladder: LadderLevel::ladder(&[(1.0, 0.3)]),
                ladder_unit: LadderUnit::R,
                breakeven_after_level: Some(1),
                taker_fee: 0.0005,
                trail_atr: Some(2.0),
                trail_after_level: Some(1),
                max_hold_ms: Some(7_200_000),
                time_stop_unless_r: Some(1.0),
                ..PolicyConfig::default()
            },
            other => {
                return Err(policy_err(
                    "preset",
                    other,
                    "must be \"standard\" or \"challenge\"",
                ))
            }
        };
        Self::new(config)
    }

    /// Returns the plain fields.
    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    pub(crate) fn derived(&self) -> &Derived {
        &self.derived
    }

    /// Returns the bar interval of the ATR in milliseconds.
    pub fn interval_ms(&self) -> i64 {
        self.derived.interval_ms
    }

    /// Returns the ladder stretch `m = clamp(1 + scale × (confidence − 0.5), m_min, m_max)`;
    /// 1 without a confidence.
    pub fn ladder_multiplier(&self, confidence: Option<f64>) -> f64 {
        match confidence {
            None => 1.0,
            Some(c) => (1.0 + self.config.confidence_scale * (c - 0.5))
                .clamp(self.config.m_min, self.config.m_max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(err: CoreError) -> String {
        match err {
            CoreError::Policy { field, .. } => field,
            other => panic!("not a policy error: {other:?}"),
        }
    }

    #[test]
    fn presets_validate() {
        let standard = ExitPolicy::preset("standard").unwrap();
        assert_eq!(standard.config().ladder.len(), 3);
        let challenge = ExitPolicy::preset("challenge").unwrap();
        assert_eq!(challenge.config().max_hold_ms, Some(7_200_000));
        assert_eq!(field_of(ExitPolicy::preset("yolo").unwrap_err()), "preset");
    }

    #[test]
    fn fractions_sum_exactly() {
        let config = PolicyConfig {
            ladder: LadderLevel::ladder(&[(1.0, 0.3), (2.0, 0.3), (3.0, 0.4)]),
            ..PolicyConfig::default()
        };
        let policy = ExitPolicy::new(config).unwrap();
        assert_eq!(
            policy.derived().cum_fractions.last().copied(),
            Some(Decimal::ONE)
        );
    }

    #[test]
    fn rejects_bad_fields() {
        let bad = |c: PolicyConfig| field_of(ExitPolicy::new(c).unwrap_err());
        assert_eq!(
            bad(PolicyConfig {
                stop_atr: Some(-1.0),
                ..PolicyConfig::default()
            }),
            "stop_atr"
        );
        assert_eq!(
            bad(PolicyConfig {
                min_stop_pct: f64::NAN,
                ..PolicyConfig::default()
            }),
            "min_stop_pct"
        );
        assert_eq!(
            bad(PolicyConfig {
                max_stop_pct: 0.001,
                ..PolicyConfig::default()
            }),
            "max_stop_pct"
        );
        let over = LadderLevel::ladder(&[(1.0, 0.6), (2.0, 0.5)]);
        assert_eq!(
            bad(PolicyConfig {
                ladder: over,
                ..PolicyConfig::default()
            }),
            "ladder[1].fraction"
        );
        let down = LadderLevel::ladder(&[(2.0, 0.5), (1.0, 0.5)]);
        assert_eq!(
            bad(PolicyConfig {
                ladder: down,
                ..PolicyConfig::default()
            }),
            "ladder[1].at"
        );
        assert_eq!(
            bad(PolicyConfig {
                breakeven_after_level: Some(1),
                ..PolicyConfig::default()
            }),
            "breakeven_after_level"
        );
        assert_eq!(
            bad(PolicyConfig {
                trail_atr: Some(1.0),
                trail_pct: Some(0.01),
                ..PolicyConfig::default()
            }),
            "trail_pct"
        );
        assert_eq!(
            bad(PolicyConfig {
                trail_activate_r: Some(1.0),
                ..PolicyConfig::default()
            }),
            "trail_activate_r"
        );
        assert_eq!(
            bad(PolicyConfig {
                time_stop_unless_r: Some(1.0),
                ..PolicyConfig::default()
            }),
            "time_stop_unless_r"
        );
        assert_eq!(
            bad(PolicyConfig {
                atr_interval: "7x".into(),
                ..PolicyConfig::default()
            }),
            "atr_interval"
        );
        assert_eq!(
            bad(PolicyConfig {
                atr_period: 0,
                ..PolicyConfig::default()
            }),
            "atr_period"
        );
    }

    #[test]
    fn serde_round_trip_validates() {
        let policy = ExitPolicy::preset("challenge").unwrap();
        let text = serde_json::to_string(&policy).unwrap();
        let back: ExitPolicy = serde_json::from_str(&text).unwrap();
        assert_eq!(back, policy);
        let broken = text.replace("\"atr_period\":14", "\"atr_period\":0");
        assert!(serde_json::from_str::<ExitPolicy>(&broken).is_err());
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval_ms("1m").unwrap(), 60_000);
        assert_eq!(parse_interval_ms("15m").unwrap(), 900_000);
        assert_eq!(parse_interval_ms("4h").unwrap(), 14_400_000);
        assert!(parse_interval_ms("m").is_err());
        assert!(parse_interval_ms("").is_err());
    }

    #[test]
    fn decimal_of_is_shortest() {
        assert_eq!(decimal_of("x", 0.3).unwrap().to_string(), "0.3");
        assert_eq!(decimal_of("x", 1e-7).unwrap().to_string(), "0.0000001");
        assert_eq!(decimal_of("x", 120.0).unwrap().to_string(), "120");
    }
}
