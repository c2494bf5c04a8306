//! A report as one self-contained HTML file: inline stylesheet, inline SVG charts (the console's
//! chart geometry, [`crate::console::svg::ledger_chart`]), no script but the JSON manifest block
//! (`type="application/json"`, never executed), nothing loaded from anywhere.
//!
//! Rendering is a pure function of the manifest, so `verify-report` renders the manifest again
//! and compares: an edit to the visible text is named by its line.

use std::fmt::Write as _;

use crate::console::format::{epsilon, utc};
use crate::console::svg::ledger_chart;

use super::{BudgetSeries, HTML_MANIFEST_ID, ReportError, ReportManifest};

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.5rem}h2{font-size:1.2rem;border-bottom:1px solid #ccc;padding-bottom:.2rem;margin-top:2rem}h3{font-size:1rem}
table{border-collapse:collapse;width:100%;margin:.5rem 0 1rem;font-size:.85rem}th,td{border:1px solid #ddd;padding:.2rem .4rem;text-align:left;vertical-align:top}th{background:#f3f4f6}
.ok{color:#1a7f37;font-weight:bold}.bad{color:#b3261e;font-weight:bold}.source{color:#555;font-size:.8rem}code{font-size:.8rem;word-break:break-all}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem}dt{font-weight:600}dd{margin:0;overflow-wrap:anywhere}
@media print{body{max-width:none}h2{page-break-after:avoid}}";

/// `text` with `&`, `<`, `>`, `"` and `'` escaped.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn chart_svg(out: &mut String, b: &BudgetSeries) {
    let c = ledger_chart(&b.points, &b.caps);
    let right = f64::from(c.width) - 16.0;
    let _ = writeln!(
        out,
        "<svg class=\"chart\" role=\"img\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" xmlns=\"http://www.w3.org/2000/svg\" aria-label=\"ε of {site}/{ds} over time\">",
        w = c.width,
        h = c.height,
        site = esc(&b.site),
        ds = esc(&b.dataset)
    );
    for t in &c.ticks {
        let _ = writeln!(
            out,
            "<line x1=\"56\" x2=\"{right}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#e3e6ea\" stroke-width=\"1\"/><text x=\"50\" y=\"{ty}\" text-anchor=\"end\" font-size=\"11\" fill=\"#555\">{l}</text>",
            y = t.y,
            ty = t.y + 4.0,
            l = esc(&t.label)
        );
    }
    for cap in &c.caps {
        let _ = writeln!(
            out,
            "<line x1=\"56\" x2=\"{right}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#b3261e\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"/><text x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\" font-size=\"11\" fill=\"#b3261e\">{l}</text>",
            y = cap.y,
            tx = right - 2.0,
            ty = cap.y - 4.0,
            l = esc(&cap.label)
        );
    }
    let _ = writeln!(
        out,
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#1a5fb4\" stroke-width=\"2\"/>",
        c.line
    );
    for p in &c.points {
        let _ = writeln!(
            out,
            "<circle cx=\"{}\" cy=\"{}\" r=\"3\" fill=\"#1a5fb4\"><title>{}</title></circle>",
            p.x,
            p.y,
            esc(&p.title)
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"56\" y=\"{y}\" font-size=\"11\" fill=\"#555\">{a}</text><text x=\"{right}\" y=\"{y}\" text-anchor=\"end\" font-size=\"11\" fill=\"#555\">{b}</text>\n</svg>",
        y = c.height - 8,
        a = esc(&c.first_time),
        b = esc(&c.last_time)
    );
}

fn table(out: &mut String, columns: &[String], rows: &[Vec<String>], empty: &str) {
    out.push_str("<table>\n<thead><tr>");
    for c in columns {
        let _ = write!(out, "<th>{}</th>", esc(c));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    if rows.is_empty() {
        let _ = writeln!(
            out,
            "<tr><td colspan=\"{}\">{}</td></tr>",
            columns.len().max(1),
            esc(empty)
        );
    }
    for r in rows {
        out.push_str("<tr>");
        for cell in r {
            let _ = write!(out, "<td>{}</td>", esc(cell));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table>\n");
}

/// The report's HTML, with the manifest embedded.
pub fn render(m: &ReportManifest) -> Result<String, ReportError> {
    let c = &m.content;
    let cp = &m.checkpoint.checkpoint;
    let v = &m.context.verification;
    let mut out = String::with_capacity(64 * 1024);
    let _ = writeln!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>\n{STYLE}\n</style>\n</head>\n<body>",
        esc(&c.title)
    );
    let _ = writeln!(out, "<h1>{}</h1>", esc(&c.title));
    let _ = writeln!(
        out,
        "<p>Made at {} for {} from the trail of <code>{}</code>.</p>",
        esc(&utc(m.context.generated_at)),
        esc(&m.context.generated_by),
        esc(&cp.log_id)
    );

    out.push_str("<h2 id=\"integrity\">Trail integrity</h2>\n<dl>\n");
    let _ = writeln!(
        out,
        "<dt>Verification</dt><dd><span class=\"{}\">{}</span> at {}: {}</dd>",
        match v.intact {
            Some(true) => "ok",
            _ => "bad",
        },
        match v.intact {
            Some(true) => "INTACT",
            Some(false) => "BROKEN",
            None => "NOT YET VERIFIED",
        },
        esc(&utc(v.verified_at)),
        esc(&v.detail)
    );
    let _ = writeln!(
        out,
        "<dt>Checkpoint</dt><dd>tree size {}, signed {}</dd>\n<dt>Root hash</dt><dd><code>{}</code></dd>\n<dt>Signature (Ed25519)</dt><dd><code>{}</code></dd>",
        cp.tree_size,
        esc(&utc(cp.timestamp)),
        hex::encode(cp.root),
        hex::encode(m.checkpoint.signature)
    );
    let _ = writeln!(
        out,
        "<dt>Retention</dt><dd>{}</dd>",
        esc(&match m.context.retention_min_days {
            Some(d) => format!(
                "[retention] min_days = {d}: the service refuses to prune events younger than that"
            ),
            None => "not known to the tool that made this report (read [retention] in the audit service's audit.toml)".into(),
        })
    );
    let _ = writeln!(
        out,
        "<dt>Content digest</dt><dd><code>{}</code></dd>\n</dl>",
        esc(&m.content_digest)
    );
    out.push_str("<p class=\"source\">Check this file against the trail: <code>tutela audit verify-report FILE</code> (the digest, the checkpoint's signature, its consistency with the trail's head, and every cited event's inclusion).</p>\n");

    out.push_str("<h2 id=\"summary\">Summary</h2>\n<dl>\n");
    for f in &c.facts {
        let _ = writeln!(out, "<dt>{}</dt><dd>{}</dd>", esc(&f.label), esc(&f.value));
    }
    out.push_str("</dl>\n");

    out.push_str("<h2 id=\"budgets\">Privacy budgets</h2>\n");
    if c.budgets.is_empty() {
        out.push_str("<p>No privacy spend is recorded in scope.</p>\n");
    }
    for b in &c.budgets {
        let _ = writeln!(
            out,
            "<h3>{}/{}</h3>\n<p>{}: ε {} after {} spend(s). Caps: {}.</p>",
            esc(&b.site),
            esc(&b.dataset),
            esc(&b.measure),
            esc(&b.epsilon_now),
            b.spends,
            esc(&if b.caps.is_empty() {
                "none recorded in the trail (a site's own caps are in its local policy)".to_string()
            } else {
                b.caps
                    .iter()
                    .map(|(l, v)| format!("{l} ε {}", epsilon(*v)))
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        );
        chart_svg(&mut out, b);
    }

    for t in &c.tables {
        let _ = writeln!(out, "<h2>{}</h2>", esc(&t.title));
        table(&mut out, &t.columns, &t.rows, "None in scope.");
        let _ = writeln!(out, "<p class=\"source\">Source: {}</p>", esc(&t.source));
    }

    for s in &c.sections {
        let _ = writeln!(
            out,
            "<h2 id=\"{}\">{}</h2>\n<p><em>{}</em></p>\n<ul>",
            esc(&s.id),
            esc(&s.title),
            esc(&s.requirement)
        );
        for st in &s.statements {
            let _ = writeln!(
                out,
                "<li>{} <span class=\"source\">(source: {})</span></li>",
                esc(&st.text),
                esc(&st.source)
            );
        }
        out.push_str("</ul>\n");
        let _ = writeln!(
            out,
            "<h3>Evidence: {} event(s): {}</h3>",
            s.evidence_total,
            esc(&s.evidence_kinds)
        );
        let rows: Vec<Vec<String>> = s.evidence.iter().map(|e| e.table_row()).collect();
        table(
            &mut out,
            &["seq", "action", "time", "actor", "subject"].map(String::from),
            &rows,
            "No event of these kinds is in scope.",
        );
        if s.evidence_total > s.evidence.len() as u64 {
            let _ = writeln!(
                out,
                "<p class=\"source\">And {} more cited in scope (the oldest are shown): <code>tutela audit log</code> lists them.</p>",
                s.evidence_total - s.evidence.len() as u64
            );
        }
    }
    let _ = writeln!(
        out,
        "<script type=\"application/json\" id=\"{HTML_MANIFEST_ID}\">\n{}\n</script>\n</body>\n</html>",
        m.embedded_json()?
    );
    Ok(out)
}

/// The manifest embedded in an HTML report, as text.
pub fn manifest_text(html: &str) -> Option<&str> {
    let open = format!("<script type=\"application/json\" id=\"{HTML_MANIFEST_ID}\">");
    let start = html.find(&open)? + open.len();
    let len = html[start..].find("</script>")?;
    Some(&html[start..start + len])
}
