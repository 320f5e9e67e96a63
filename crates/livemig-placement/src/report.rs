//! Plain-text rendering of an evaluation: the choice, the ranked table and
//! the exclusions, optionally with every score's breakdown.

use std::fmt::Write as _;

use crate::engine::{Candidate, Decision, Evaluation, Excluded};
use crate::score::Term;

fn vm_label(e: &Evaluation) -> String {
    if e.vm.is_empty() {
        "VM".to_string()
    } else {
        format!("VM `{}`", e.vm)
    }
}

fn time(t: Option<f64>) -> String {
    match t {
        Some(t) => format!("{t:.1} s"),
        None => "never".to_string(),
    }
}

/// Renders a decision: the chosen host, then [`render_evaluation`].
pub fn render_decision(d: &Decision, explain: bool) -> String {
    let c = &d.chosen;
    let mut out = format!(
        "chosen: {} -> {} (score {:.6})\n",
        c.name, c.migration_address, c.score
    );
    out.push_str(&render_evaluation(&d.evaluation, explain));
    out
}

/// Renders the summary line, the ranked table and the excluded hosts; with
/// `explain`, also the filters, the formula, the tie rule and every
/// candidate's score breakdown.
pub fn render_evaluation(e: &Evaluation, explain: bool) -> String {
    let mut out = String::new();
    let n = e.ranking.len() + e.excluded.len();
    let _ = writeln!(
        out,
        "{} on `{}`: {n} hosts, {} eligible, {} excluded",
        vm_label(e),
        e.current_host,
        e.ranking.len(),
        e.excluded.len()
    );
    if explain {
        let c = &e.config;
        let w = &c.weights;
        let s = w.sum();
        let _ = writeln!(
            out,
            "filters, in order: current_host, maintenance, memory (VM + {} MiB headroom), \
             vcpu_overcommit (at most {} vCPUs per CPU), cpu_features, anti_affinity",
            c.memory_headroom_mib, c.vcpu_overcommit_ratio
        );
        let _ = writeln!(
            out,
            "score = {:.4} x free_memory + {:.4} x cpu_headroom + {:.4} x migration_time + {:.4} x balance, \
             rounded to 6 decimals",
            w.free_memory / s,
            w.cpu_headroom / s,
            w.migration_time / s,
            w.balance / s,
        );
        let _ = writeln!(
            out,
            "migration_time = t_ref / (t_ref + t), t_ref = {} s; ties (equal 6-decimal scores): host name ascending",
            c.migration_time_reference_s
        );
        let _ = writeln!(
            out,
            "cluster memory imbalance now (std. dev. of utilisation): {:.4}",
            e.cluster_imbalance_now
        );
    }
    if !e.ranking.is_empty() {
        out.push('\n');
        out.push_str(&render_table(&e.ranking));
    }
    if explain {
        for c in &e.ranking {
            out.push_str(&render_breakdown(c));
        }
    }
    if !e.excluded.is_empty() {
        out.push('\n');
        out.push_str(&render_exclusions(&e.excluded));
    }
    out
}

/// The ranked table, one line per eligible host.
pub fn render_table(ranking: &[Candidate]) -> String {
    let w = ranking
        .iter()
        .map(|c| c.name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rank  {:<w$}  score     free_mem  cpu_head  mig_time  balance   est_time",
        "host"
    );
    for c in ranking {
        let t = &c.terms;
        let _ = writeln!(
            out,
            "{:>4}  {:<w$}  {:.6}  {:<8.4}  {:<8.4}  {:<8.4}  {:<8.4}  {}",
            c.rank,
            c.name,
            c.score,
            t.free_memory.value,
            t.cpu_headroom.value,
            t.migration_time.value,
            t.balance.value,
            time(c.facts.migration_time_s)
        );
    }
    out
}

fn term_line(out: &mut String, pad: &str, first: bool, name: &str, t: &Term, fact: &str) {
    let _ = writeln!(
        out,
        "{pad}{} {name:<14} {:.4} x {:.4} = {:.6}  ({fact})",
        if first { "=" } else { "+" },
        t.weight,
        t.value,
        t.contribution
    );
}

/// One candidate's score, term by term, with the facts behind each term.
pub fn render_breakdown(c: &Candidate) -> String {
    let mut out = String::new();
    let head = format!("  #{} {}: {:.6} ", c.rank, c.name, c.score);
    let pad = " ".repeat(head.len());
    let t = &c.terms;
    let f = &c.facts;
    out.push('\n');
    out.push_str(&head);
    let mut first_line = String::new();
    term_line(
        &mut first_line,
        "",
        true,
        "free_memory",
        &t.free_memory,
        &format!("{} MiB free after", f.free_memory_after_mib),
    );
    out.push_str(&first_line);
    term_line(
        &mut out,
        &pad,
        false,
        "cpu_headroom",
        &t.cpu_headroom,
        &format!("{:.2} CPUs idle after", f.cpu_headroom_after),
    );
    let mig = match f.migration_time_s {
        Some(s) => format!("about {s:.1} s"),
        None => "never converges: dirty rate >= link bandwidth".to_string(),
    };
    term_line(
        &mut out,
        &pad,
        false,
        "migration_time",
        &t.migration_time,
        &mig,
    );
    term_line(
        &mut out,
        &pad,
        false,
        "balance",
        &t.balance,
        &format!("imbalance after {:.4}", f.cluster_imbalance_after),
    );
    out
}

/// The excluded hosts, one line per failed filter.
pub fn render_exclusions(excluded: &[Excluded]) -> String {
    let w = excluded.iter().map(|e| e.name.len()).max().unwrap_or(0);
    let mut out = format!("excluded ({}):\n", excluded.len());
    for e in excluded {
        for (i, r) in e.reasons.iter().enumerate() {
            let name = if i == 0 { e.name.as_str() } else { "" };
            let _ = writeln!(out, "  {name:<w$}  {r}");
        }
    }
    out
}
