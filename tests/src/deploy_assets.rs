//! The operator assets in `deploy/` that name metrics — the Prometheus alert rules and the Grafana
//! dashboard — read as files, and the Prometheus text a running process exports, so that tests
//! can check that every metric an alert or a panel uses really exists.
//!
//! The signer's and the submitter's tests scrape their own process and call
//! [`check_exported`] with their prefix; [`names_used`] returns every `castellan_*` name of
//! both files, so a name with an unknown prefix fails here too (nothing goes unchecked).

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value;

/// Prefix of the signer's metrics.
pub const SIGNER_PREFIX: &str = "castellan_signer_";
/// Prefix of the submitter's metrics.
pub const SUBMITTER_PREFIX: &str = "castellan_submitter_";

/// The repository's root.
pub fn repo_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// Path of the alert rules.
pub fn rules_path() -> PathBuf {
    repo_root().join("deploy/prometheus/castellan-rules.yml")
}

/// Path of the Grafana dashboard.
pub fn dashboard_path() -> PathBuf {
    repo_root().join("deploy/grafana/castellan.json")
}

/// The alert rules' text.
pub fn rules_text() -> Result<String, String> {
    let p = rules_path();
    std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))
}

/// The dashboard, parsed (an error if it is not JSON).
pub fn dashboard() -> Result<Value, String> {
    let p = dashboard_path();
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} is not valid JSON: {e}", p.display()))
}

/// Every PromQL expression of the dashboard: panel targets and template variable queries.
pub fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    let mut out = Vec::new();
    collect_exprs(dashboard, &mut out);
    out
}

/// Every `castellan_*` metric name in `text` (PromQL or a whole rules file).
pub fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while let Some(at) = text[i..].find("castellan_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        if start == 0 || !word(bytes[start - 1]) {
            names.insert(text[start..end].to_owned());
        }
        i = end.max(start + 1);
    }
    names
}

/// Every metric name used by the alert rules and the dashboard, with where it is used.
pub fn names_used() -> Result<Vec<(String, &'static str)>, String> {
    let mut used = Vec::new();
    for n in metric_names(&rules_text()?) {
        used.push((n, "deploy/prometheus/castellan-rules.yml"));
    }
    let mut in_dashboard = BTreeSet::new();
    for e in dashboard_exprs(&dashboard()?) {
        in_dashboard.extend(metric_names(&e));
    }
    for n in in_dashboard {
        used.push((n, "deploy/grafana/castellan.json"));
    }
    Ok(used)
}

/// The sample names a Prometheus (or OpenMetrics) text exposition can answer queries for,
/// derived from its `# TYPE` lines and its sample lines (prometheus-client writes nothing for a
/// labelled family without samples: scrape after the traffic that creates them): a counter `x` is queried as `x_total`, a histogram as `x_bucket`, `x_sum` and
/// `x_count`.
pub fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            match kind {
                "counter" => {
                    let base = name.strip_suffix("_total").unwrap_or(name);
                    names.insert(format!("{base}_total"));
                }
                "histogram" => {
                    for s in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{s}"));
                    }
                }
                _ => {
                    names.insert(name.to_owned());
                }
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    names
}

/// Checks that every name with `prefix` used by the rules or the dashboard is in `exposition`;
/// returns how many names were checked, or the missing ones with where they are used.
pub fn check_exported(prefix: &str, exposition: &str) -> Result<usize, String> {
    let exported = exported_names(exposition);
    let used = names_used()?;
    let mine: Vec<_> = used.iter().filter(|(n, _)| n.starts_with(prefix)).collect();
    let missing: Vec<String> = mine
        .iter()
        .filter(|(n, _)| !exported.contains(n))
        .map(|(n, file)| format!("{n} (in {file})"))
        .collect();
    if missing.is_empty() {
        Ok(mine.len())
    } else {
        Err(format!(
            "metrics used but not exported: {}\nexported: {exported:?}",
            missing.join(", ")
        ))
    }
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::String(s)) if s.contains('(') => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn metric_names_are_whole_words_with_the_prefix() {
        let e = r#"sum(rate(castellan_signer_requests_total{code="x"}[5m])) / my_castellan_x + castellan_submitter_head_block"#;
        let n: Vec<_> = metric_names(e).into_iter().collect();
        assert_eq!(
            n,
            [
                "castellan_signer_requests_total",
                "castellan_submitter_head_block"
            ]
        );
    }

    #[test]
    fn exported_names_expand_counters_and_histograms() {
        let text = "# HELP a_requests x\n# TYPE a_requests counter\n\
                    # TYPE a_seconds histogram\n# TYPE a_up gauge\na_up 1\n# EOF\n";
        let n = exported_names(text);
        for want in [
            "a_requests_total",
            "a_seconds_bucket",
            "a_seconds_sum",
            "a_seconds_count",
            "a_up",
        ] {
            assert!(n.contains(want), "{want} in {n:?}");
        }
        assert!(
            !n.contains("a_requests") && !n.contains("a_seconds"),
            "{n:?}"
        );
    }

    /// Every name in the rules and the dashboard belongs to the signer or the submitter, whose
    /// own tests check it against a scrape: none escapes the check.
    #[test]
    fn every_metric_name_used_has_a_checked_prefix() {
        let used = names_used().unwrap();
        assert!(used.len() >= 15, "{used:?}");
        let stray: Vec<_> = used
            .iter()
            .filter(|(n, _)| !n.starts_with(SIGNER_PREFIX) && !n.starts_with(SUBMITTER_PREFIX))
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
    }

    /// The dashboard is valid JSON, chooses its Prometheus data source through a variable, and
    /// every panel queries through that variable with at least one expression.
    #[test]
    fn dashboard_is_json_with_a_datasource_variable_and_queries_in_every_panel() {
        let d = dashboard().unwrap();
        assert_eq!(d["uid"], "castellan");
        let vars = d["templating"]["list"].as_array().unwrap();
        assert!(
            vars.iter().any(|v| v["name"] == "datasource"
                && v["type"] == "datasource"
                && v["query"] == "prometheus"),
            "{vars:?}"
        );
        let panels = d["panels"].as_array().unwrap();
        let mut ids = BTreeSet::new();
        let mut queried = 0;
        for p in panels {
            assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate id in {p}");
            assert!(p["gridPos"]["w"].as_u64().is_some(), "{p}");
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{}", p["title"]);
            for t in targets {
                assert_eq!(t["datasource"]["uid"], "${datasource}", "{}", p["title"]);
                let e = t["expr"].as_str().unwrap();
                assert!(!metric_names(e).is_empty(), "{}: {e}", p["title"]);
                queried += 1;
            }
        }
        assert!(queried >= 20, "{queried}");
        // The panels the operator needs are there.
        let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
        for want in [
            "Requests by route and code",
            "Latency quantiles by route",
            "HSM ready",
            "Freeze",
            "Refusals by code",
            "TLS refusals",
            "Relay breakers",
            "Bundles by state",
            "Fan-out latency by relay (p50, p99)",
        ] {
            assert!(titles.contains(&want), "{want} in {titles:?}");
        }
    }

    /// The seven alerts the operating guide names are in the rules file.
    #[test]
    fn rules_name_the_alerts_of_the_operating_guide() {
        let rules = rules_text().unwrap();
        for alert in [
            "CastellanSignerHsmUnavailable",
            "CastellanSigningErrorRate",
            "CastellanSigningFrozen",
            "CastellanApprovalBacklog",
            "CastellanRelayBreakerOpen",
            "CastellanKeyRotationOverdue",
            "CastellanBundleInclusionRateLow",
        ] {
            assert!(rules.contains(&format!("- alert: {alert}\n")), "{alert}");
        }
    }
}
