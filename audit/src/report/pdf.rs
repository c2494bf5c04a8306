//! A report as PDF, written with `pdf-writer` (pure Rust, no external program): A4 pages in the
//! standard Helvetica fonts (WinAnsi encoding, so every word is extractable text), the budget
//! charts drawn as vector paths from the same geometry as the HTML's SVG, and the manifest as
//! the embedded file [`PDF_MANIFEST_NAME`].
//!
//! Content streams are left uncompressed: the file stays deterministic (a pure function of the
//! manifest, which `verify-report` relies on) and an edit to a page's text can be named line by
//! line. Characters outside WinAnsi are spelled out (ε as "eps", δ as "delta", ≥ as ">=").

use pdf_writer::{Content, Finish, Name, Pdf, Rect, Ref, Str, TextStr};

use crate::console::format::{epsilon, utc};
use crate::console::svg::ledger_chart;

use super::{BudgetSeries, PDF_MANIFEST_NAME, ReportError, ReportManifest};

const PAGE_W: f32 = 595.0;
const PAGE_H: f32 = 842.0;
const MARGIN: f32 = 48.0;
const TEXT_W: f32 = PAGE_W - 2.0 * MARGIN;
const BODY: f32 = 9.0;
const SMALL: f32 = 7.5;

const REGULAR: Name<'static> = Name(b"F1");
const BOLD: Name<'static> = Name(b"F2");
const MONO: Name<'static> = Name(b"F3");

/// `text` in WinAnsiEncoding (Windows-1252) bytes: what the standard fonts show. Characters it
/// lacks are spelled out or become `?`.
pub fn winansi(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match c {
            ' '..='~' => out.push(c as u8),
            '\u{a0}'..='\u{ff}' => out.push(c as u32 as u8),
            '—' => out.push(0x97),
            '–' => out.push(0x96),
            '…' => out.push(0x85),
            '’' => out.push(0x92),
            '‘' => out.push(0x91),
            '“' => out.push(0x93),
            '”' => out.push(0x94),
            '•' => out.push(0x95),
            'ε' => out.extend_from_slice(b"eps"),
            'δ' => out.extend_from_slice(b"delta"),
            'σ' => out.extend_from_slice(b"sigma"),
            '≥' => out.extend_from_slice(b">="),
            '≤' => out.extend_from_slice(b"<="),
            '→' => out.extend_from_slice(b"->"),
            '\n' | '\t' => out.push(b' '),
            _ => out.push(b'?'),
        }
    }
    out
}

/// Approximate advance of `n` characters of Helvetica at `size` (a conservative average).
fn width_of(n: usize, size: f32, bold: bool) -> f32 {
    n as f32 * size * if bold { 0.58 } else { 0.54 }
}

/// How many characters fit in `w` points.
fn chars_in(w: f32, size: f32, bold: bool) -> usize {
    ((w / (size * if bold { 0.58 } else { 0.54 })) as usize).max(1)
}

/// `text` broken into lines of at most `max` characters, at spaces where possible.
pub fn wrap(text: &str, max: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split(' ') {
        let mut word = word.to_string();
        loop {
            let len = line.chars().count();
            let wlen = word.chars().count();
            let sep = usize::from(len > 0);
            if len + sep + wlen <= max {
                if sep == 1 {
                    line.push(' ');
                }
                line.push_str(&word);
                break;
            }
            if len > 0 {
                lines.push(std::mem::take(&mut line));
                continue;
            }
            // A word longer than a line (a digest): cut it.
            let cut: String = word.chars().take(max).collect();
            word = word.chars().skip(max).collect();
            lines.push(cut);
            if word.is_empty() {
                break;
            }
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// Pages being laid out, top to bottom.
struct Layout {
    pages: Vec<Content>,
    page: Content,
    y: f32,
}

impl Layout {
    fn new() -> Layout {
        Layout {
            pages: Vec::new(),
            page: Content::new(),
            y: PAGE_H - MARGIN,
        }
    }

    fn new_page(&mut self) {
        let done = std::mem::replace(&mut self.page, Content::new());
        self.pages.push(done);
        self.y = PAGE_H - MARGIN;
    }

    /// Room for `h` points on this page, else a new one.
    fn ensure(&mut self, h: f32) {
        if self.y - h < MARGIN + 14.0 {
            self.new_page();
        }
    }

    fn text_at(&mut self, x: f32, y: f32, font: Name<'_>, size: f32, text: &str) {
        let bytes = winansi(text);
        self.page
            .begin_text()
            .set_font(font, size)
            .next_line(x, y)
            .show(Str(&bytes))
            .end_text();
    }

    /// A paragraph, wrapped to the text width, indented by `indent`.
    fn para(&mut self, font: Name<'_>, size: f32, indent: f32, text: &str) {
        let bold = font == BOLD;
        let lead = size * 1.3;
        for line in wrap(text, chars_in(TEXT_W - indent, size, bold)) {
            self.ensure(lead);
            self.y -= lead;
            self.text_at(MARGIN + indent, self.y, font, size, &line);
        }
    }

    /// A bold label in a left column and its value wrapped beside it.
    fn label_value(&mut self, label: &str, value: &str) {
        const LABEL_W: f32 = 170.0;
        let lead = BODY * 1.3;
        let labels = wrap(label, chars_in(LABEL_W - 6.0, BODY, true));
        let values = wrap(value, chars_in(TEXT_W - LABEL_W, BODY, false));
        let lines = labels.len().max(values.len());
        self.ensure(lead * lines as f32);
        let top = self.y;
        for (k, l) in labels.iter().enumerate() {
            self.text_at(MARGIN, top - lead * (k as f32 + 1.0), BOLD, BODY, l);
        }
        for (k, v) in values.iter().enumerate() {
            self.text_at(
                MARGIN + LABEL_W,
                top - lead * (k as f32 + 1.0),
                REGULAR,
                BODY,
                v,
            );
        }
        self.y = top - lead * lines as f32 - 1.5;
    }

    fn heading(&mut self, size: f32, text: &str) {
        self.ensure(size * 3.0);
        self.y -= size * 0.8;
        self.para(BOLD, size, 0.0, text);
        self.y -= 3.0;
    }

    fn gap(&mut self, h: f32) {
        self.y -= h;
    }

    /// A table: header in bold, cells wrapped within columns sized by their content.
    fn table(&mut self, columns: &[String], rows: &[Vec<String>], empty: &str) {
        let n = columns.len().max(1);
        let longest: Vec<usize> = (0..n)
            .map(|i| {
                rows.iter()
                    .filter_map(|r| r.get(i))
                    .chain(columns.get(i))
                    .map(|c| c.chars().count().min(48))
                    .max()
                    .unwrap_or(1)
                    .max(4)
            })
            .collect();
        // Narrow columns (up to 22 characters) keep their natural width; the wide ones share
        // what is left in proportion to theirs. Everything scales up when it all fits.
        let natural: Vec<f32> = longest
            .iter()
            .map(|l| width_of(*l, SMALL, true) + 6.0)
            .collect();
        let total: f32 = natural.iter().sum();
        let widths: Vec<f32> = if total <= TEXT_W {
            natural.iter().map(|w| w * TEXT_W / total).collect()
        } else {
            let narrow_limit = width_of(22, SMALL, true) + 6.0;
            let fixed: f32 = natural.iter().filter(|w| **w <= narrow_limit).sum();
            let wide: f32 = natural.iter().filter(|w| **w > narrow_limit).sum();
            let room = (TEXT_W - fixed).max(TEXT_W * 0.3);
            natural
                .iter()
                .map(|w| {
                    if *w <= narrow_limit {
                        *w
                    } else {
                        w * room / wide
                    }
                })
                .collect()
        };
        let lead = SMALL * 1.3;
        let draw_row = |lay: &mut Layout, cells: &[String], font: Name<'_>| {
            let wrapped: Vec<Vec<String>> = (0..n)
                .map(|i| {
                    let cell = cells.get(i).map_or("", String::as_str);
                    wrap(cell, chars_in(widths[i] - 4.0, SMALL, font == BOLD))
                })
                .collect();
            let lines = wrapped.iter().map(Vec::len).max().unwrap_or(1);
            let h = lines as f32 * lead + 3.0;
            lay.ensure(h);
            let top = lay.y;
            let mut x = MARGIN;
            for (i, cell) in wrapped.iter().enumerate() {
                for (k, line) in cell.iter().enumerate() {
                    lay.text_at(x + 1.0, top - lead * (k as f32 + 1.0), font, SMALL, line);
                }
                x += widths[i];
            }
            lay.y = top - h;
            lay.page
                .set_stroke_gray(0.8)
                .set_line_width(0.4)
                .move_to(MARGIN, lay.y + 1.0)
                .line_to(MARGIN + TEXT_W, lay.y + 1.0)
                .stroke();
        };
        draw_row(self, columns, BOLD);
        if rows.is_empty() {
            self.para(REGULAR, SMALL, 0.0, empty);
        }
        for r in rows {
            draw_row(self, r, REGULAR);
        }
        self.gap(4.0);
    }

    /// A budget's chart, drawn from the console's chart geometry scaled to the text width.
    fn chart(&mut self, b: &BudgetSeries) {
        let c = ledger_chart(&b.points, &b.caps);
        let s = TEXT_W / c.width as f32;
        let h = c.height as f32 * s;
        self.ensure(h + 6.0);
        let top = self.y;
        let x0 = MARGIN;
        let px = |x: f64| x0 + x as f32 * s;
        let py = |y: f64| top - y as f32 * s;
        let right = c.width as f64 - 16.0;
        for t in &c.ticks {
            self.page
                .set_stroke_gray(0.85)
                .set_line_width(0.5)
                .move_to(px(56.0), py(t.y))
                .line_to(px(right), py(t.y))
                .stroke();
            let label = &t.label;
            let lx = px(50.0) - width_of(label.chars().count(), SMALL, false);
            self.text_at(lx, py(t.y) - 2.5, REGULAR, SMALL, label);
        }
        for cap in &c.caps {
            self.page
                .save_state()
                .set_stroke_rgb(0.7, 0.15, 0.12)
                .set_line_width(1.0)
                .set_dash_pattern([4.0, 3.0], 0.0)
                .move_to(px(56.0), py(cap.y))
                .line_to(px(right), py(cap.y))
                .stroke()
                .restore_state();
            let lx = px(right) - width_of(winansi(&cap.label).len(), SMALL, false);
            self.text_at(lx, py(cap.y) + 3.0, REGULAR, SMALL, &cap.label);
        }
        if let Some((first, rest)) = c.points.split_first() {
            self.page
                .set_stroke_rgb(0.1, 0.37, 0.7)
                .set_line_width(1.4)
                .move_to(px(first.x), py(first.y));
            for p in rest {
                self.page.line_to(px(p.x), py(p.y));
            }
            self.page.stroke();
            self.page.set_fill_rgb(0.1, 0.37, 0.7);
            for p in &c.points {
                self.page.rect(px(p.x) - 1.5, py(p.y) - 1.5, 3.0, 3.0);
            }
            self.page.fill_nonzero();
            self.page.set_fill_gray(0.0);
        }
        let base = py(c.height as f64 - 8.0);
        self.text_at(px(56.0), base, REGULAR, SMALL, &c.first_time);
        let lx = px(right) - width_of(c.last_time.chars().count(), SMALL, false);
        self.text_at(lx, base, REGULAR, SMALL, &c.last_time);
        self.y = top - h - 6.0;
    }

    fn finish(mut self) -> Vec<Content> {
        self.new_page();
        self.pages
    }
}

/// The report's PDF, with the manifest embedded.
pub fn render(m: &ReportManifest) -> Result<Vec<u8>, ReportError> {
    let c = &m.content;
    let cp = &m.checkpoint.checkpoint;
    let v = &m.context.verification;
    let mut lay = Layout::new();
    lay.heading(15.0, &c.title);
    lay.para(
        REGULAR,
        BODY,
        0.0,
        &format!(
            "Made at {} for {} from the trail of {}.",
            utc(m.context.generated_at),
            m.context.generated_by,
            cp.log_id
        ),
    );

    lay.heading(12.0, "Trail integrity");
    let kv = |lay: &mut Layout, k: &str, v: &str| lay.label_value(k, v);
    kv(
        &mut lay,
        "Verification",
        &format!(
            "{} at {}: {}",
            match v.intact {
                Some(true) => "INTACT",
                Some(false) => "BROKEN",
                None => "NOT YET VERIFIED",
            },
            utc(v.verified_at),
            v.detail
        ),
    );
    kv(
        &mut lay,
        "Checkpoint",
        &format!("tree size {}, signed {}", cp.tree_size, utc(cp.timestamp)),
    );
    kv(&mut lay, "Root hash", &hex::encode(cp.root));
    kv(
        &mut lay,
        "Signature (Ed25519)",
        &hex::encode(m.checkpoint.signature),
    );
    kv(
        &mut lay,
        "Retention",
        &match m.context.retention_min_days {
            Some(d) => format!(
                "[retention] min_days = {d}: the service refuses to prune events younger than that"
            ),
            None => "not known to the tool that made this report (read [retention] in the audit service's audit.toml)".into(),
        },
    );
    kv(&mut lay, "Content digest", &m.content_digest);
    lay.para(
        REGULAR,
        SMALL,
        0.0,
        "Check this file against the trail: tutela audit verify-report FILE (the digest, the checkpoint's signature, its consistency with the trail's head, and every cited event's inclusion).",
    );

    lay.heading(12.0, "Summary");
    for f in &c.facts {
        kv(&mut lay, &f.label, &f.value);
    }

    lay.heading(12.0, "Privacy budgets");
    if c.budgets.is_empty() {
        lay.para(REGULAR, BODY, 0.0, "No privacy spend is recorded in scope.");
    }
    for b in &c.budgets {
        // Keep a budget's heading, line and chart on one page.
        lay.ensure(250.0);
        lay.heading(10.0, &format!("{}/{}", b.site, b.dataset));
        lay.para(
            REGULAR,
            BODY,
            0.0,
            &format!(
                "{}: ε {} after {} spend(s). Caps: {}.",
                b.measure,
                b.epsilon_now,
                b.spends,
                if b.caps.is_empty() {
                    "none recorded in the trail (a site's own caps are in its local policy)"
                        .to_string()
                } else {
                    b.caps
                        .iter()
                        .map(|(l, v)| format!("{l} ε {}", epsilon(*v)))
                        .collect::<Vec<_>>()
                        .join("; ")
                }
            ),
        );
        lay.chart(b);
    }

    for t in &c.tables {
        lay.heading(12.0, &t.title);
        lay.table(&t.columns, &t.rows, "None in scope.");
        lay.para(REGULAR, SMALL, 0.0, &format!("Source: {}", t.source));
    }

    for s in &c.sections {
        lay.heading(12.0, &s.title);
        lay.para(REGULAR, BODY, 0.0, &s.requirement);
        lay.gap(3.0);
        for st in &s.statements {
            lay.para(REGULAR, BODY, 8.0, &format!("• {}", st.text));
            lay.para(REGULAR, SMALL, 16.0, &format!("(source: {})", st.source));
        }
        lay.heading(
            9.5,
            &format!(
                "Evidence: {} event(s): {}",
                s.evidence_total, s.evidence_kinds
            ),
        );
        let rows: Vec<Vec<String>> = s.evidence.iter().map(|e| e.table_row()).collect();
        lay.table(
            &["seq", "action", "time", "actor", "subject"].map(String::from),
            &rows,
            "No event of these kinds is in scope.",
        );
        if s.evidence_total > s.evidence.len() as u64 {
            lay.para(
                REGULAR,
                SMALL,
                0.0,
                &format!(
                    "And {} more cited in scope (the oldest are shown): tutela audit log lists them.",
                    s.evidence_total - s.evidence.len() as u64
                ),
            );
        }
    }
    let pages = lay.finish();
    write_pdf(m, pages)
}

fn write_pdf(m: &ReportManifest, pages: Vec<Content>) -> Result<Vec<u8>, ReportError> {
    let catalog = Ref::new(1);
    let tree = Ref::new(2);
    let fonts = [Ref::new(3), Ref::new(4), Ref::new(5)];
    let manifest_stream = Ref::new(6);
    let manifest_spec = Ref::new(7);
    let info = Ref::new(8);
    let first_page = 10;
    let page_ids: Vec<Ref> = (0..pages.len())
        .map(|i| Ref::new(first_page + 2 * i as i32))
        .collect();

    let json = m.embedded_json()?;
    let mut pdf = Pdf::new();
    {
        let mut cat = pdf.catalog(catalog);
        cat.pages(tree);
        cat.names()
            .embedded_files()
            .names()
            .insert(Str(PDF_MANIFEST_NAME.as_bytes()), manifest_spec);
        cat.insert(Name(b"AF")).array().item(manifest_spec);
        cat.finish();
    }
    pdf.pages(tree)
        .kids(page_ids.iter().copied())
        .count(page_ids.len() as i32);
    for (font, base) in fonts
        .iter()
        .zip([&b"Helvetica"[..], b"Helvetica-Bold", b"Courier"])
    {
        pdf.type1_font(*font)
            .base_font(Name(base))
            .encoding_predefined(Name(b"WinAnsiEncoding"));
    }
    pdf.embedded_file(manifest_stream, json.as_bytes())
        .subtype(Name(b"application/json"));
    pdf.file_spec(manifest_spec)
        .path(Str(PDF_MANIFEST_NAME.as_bytes()))
        .unic_file(TextStr(PDF_MANIFEST_NAME))
        .description(TextStr(
            "The report's signed machine-readable manifest: tutela audit verify-report checks it",
        ))
        .embedded_file(manifest_stream)
        .association_kind(pdf_writer::types::AssociationKind::Data);
    pdf.document_info(info)
        .title(TextStr(&m.content.title))
        .producer(TextStr("tutela-audit"))
        .subject(TextStr(&format!("content digest {}", m.content_digest)));

    let total = pages.len();
    for (i, mut content) in pages.into_iter().enumerate() {
        let footer = format!(
            "{} - page {} of {} - content digest {}",
            m.content.title,
            i + 1,
            total,
            &m.content_digest.get(..16).unwrap_or("")
        );
        let footer = winansi(&footer);
        content
            .begin_text()
            .set_font(REGULAR, 6.5)
            .next_line(MARGIN, MARGIN - 20.0)
            .show(Str(&footer))
            .end_text();
        let page_id = page_ids[i];
        let content_id = Ref::new(page_id.get() + 1);
        let mut page = pdf.page(page_id);
        page.media_box(Rect::new(0.0, 0.0, PAGE_W, PAGE_H));
        page.parent(tree);
        page.contents(content_id);
        {
            let mut res = page.resources();
            let mut f = res.fonts();
            f.pair(REGULAR, fonts[0]);
            f.pair(BOLD, fonts[1]);
            f.pair(MONO, fonts[2]);
        }
        page.finish();
        let bytes = content.finish();
        pdf.stream(content_id, bytes.as_slice());
    }
    Ok(pdf.finish())
}

/// The manifest embedded in a PDF this module wrote: the stream of the `/EmbeddedFile` object.
pub fn manifest_bytes(pdf: &[u8]) -> Option<&[u8]> {
    let marker = b"/Type /EmbeddedFile";
    let at = find(pdf, marker, 0)?;
    // The object's dictionary: from its `obj` back to its `stream` keyword.
    let obj_start = rfind(&pdf[..at], b" obj")?;
    let stream_kw = find(pdf, b"stream\n", at)?;
    let dict = std::str::from_utf8(&pdf[obj_start..stream_kw]).ok()?;
    let len_at = dict.find("/Length ")? + "/Length ".len();
    let len: usize = dict[len_at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let start = stream_kw + b"stream\n".len();
    pdf.get(start..start.checked_add(len)?)
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_wraps_at_spaces_and_cuts_long_words() {
        assert_eq!(wrap("a bb ccc", 4), vec!["a bb", "ccc"]);
        assert_eq!(wrap("0123456789", 4), vec!["0123", "4567", "89"]);
        assert_eq!(wrap("", 4), vec![""]);
    }

    #[test]
    fn winansi_keeps_section_signs_and_spells_out_greek() {
        assert_eq!(winansi("§164.312(b)"), b"\xa7164.312(b)".to_vec());
        assert_eq!(winansi("ε 0.42, δ"), b"eps 0.42, delta".to_vec());
        assert_eq!(winansi("—"), vec![0x97]);
    }
}
