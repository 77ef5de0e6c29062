//! A minimal SVG writer for the pictures vmbind draws (a VM's VA space, benchmark charts):
//! elements appended as text, attribute values and text escaped.
#![forbid(unsafe_code)]

use core::fmt::Write;

/// Escapes `&`, `<`, `>` and `"` for text and attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// An SVG document being written.
pub(crate) struct Svg {
    body: String,
    width: f64,
    height: f64,
}

impl Svg {
    /// A document of `width` x `height` user units, white background.
    pub(crate) fn new(width: f64, height: f64) -> Self {
        let mut s = Svg { body: String::new(), width, height };
        s.raw(&format!(r##"<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>"##));
        s
    }

    /// Appends raw markup (already escaped).
    pub(crate) fn raw(&mut self, markup: &str) {
        self.body.push_str(markup);
        self.body.push('\n');
    }

    /// A rectangle with a fill, extra attributes (`name`, value: escaped here) and a tooltip.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rect(
        &mut self,
        x: f64,
        y: f64,
        w: f64,
        h: f64,
        fill: &str,
        attrs: &[(&str, String)],
        title: &str,
    ) {
        let mut a = String::new();
        for (k, v) in attrs {
            let _ = write!(a, r#" {k}="{}""#, esc(v));
        }
        let _ = write!(
            self.body,
            r#"<rect x="{x:.2}" y="{y:.2}" width="{w:.2}" height="{h:.2}" fill="{}"{a}>"#,
            esc(fill)
        );
        if title.is_empty() {
            self.body.push_str("</rect>\n");
        } else {
            let _ = writeln!(self.body, "<title>{}</title></rect>", esc(title));
        }
    }

    /// Text at `(x, y)` (`anchor`: start, middle or end).
    pub(crate) fn text(&mut self, x: f64, y: f64, size: f64, anchor: &str, fill: &str, text: &str) {
        let _ = writeln!(
            self.body,
            r#"<text x="{x:.2}" y="{y:.2}" font-family="monospace" font-size="{size}" text-anchor="{anchor}" fill="{fill}">{}</text>"#,
            esc(text)
        );
    }

    /// A line.
    pub(crate) fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, stroke: &str, dash: bool) {
        let d = if dash { r#" stroke-dasharray="3,3""# } else { "" };
        let _ = writeln!(
            self.body,
            r#"<line x1="{x1:.2}" y1="{y1:.2}" x2="{x2:.2}" y2="{y2:.2}" stroke="{stroke}" stroke-width="1"{d}/>"#
        );
    }

    /// The finished document.
    pub(crate) fn finish(self, defs: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\n<defs>{defs}</defs>\n{}</svg>\n",
            self.body,
            w = self.width,
            h = self.height
        )
    }
}

/// A colour for the `i`-th of several series (distinct hues, readable on white).
pub(crate) fn palette(i: usize) -> String {
    const P: [&str; 12] = [
        "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f",
        "#86bcb6", "#d37295", "#a0cbe8",
    ];
    if i < P.len() {
        P[i].to_string()
    } else {
        // Further hues by the golden angle.
        let hue = (i as f64 * 137.508) % 360.0;
        format!("hsl({hue:.0},55%,55%)")
    }
}
