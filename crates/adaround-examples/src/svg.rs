//! Two small SVG charts, written by hand (no system libraries).

use std::fmt::Write;

const W: f64 = 640.0;
const H: f64 = 320.0;
const PAD: f64 = 48.0;
const COLORS: [&str; 3] = ["#9aa5b1", "#1f77b4", "#d62728"];

fn header(title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n\
         <line x1=\"{PAD}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
        W / 2.0,
        escape(title),
        H - PAD,
        W - PAD / 2.0,
        H - PAD
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn legend(svg: &mut String, names: &[&str]) {
    for (i, name) in names.iter().enumerate() {
        let x = PAD + 10.0 + 150.0 * i as f64;
        let _ = writeln!(
            svg,
            "<rect x=\"{x}\" y=\"32\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"43\">{}</text>",
            COLORS[i % COLORS.len()],
            x + 16.0,
            escape(name)
        );
    }
}

/// Grouped bars: one group per label, one bar per series (`(name, values)`).
pub fn bars(title: &str, labels: &[String], series: &[(&str, Vec<f64>)], y_label: &str) -> String {
    let mut svg = header(title);
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-30);
    let group = (W - 1.5 * PAD) / labels.len().max(1) as f64;
    let bar = group * 0.8 / series.len().max(1) as f64;
    let plot_h = H - 2.0 * PAD - 16.0;
    for (g, label) in labels.iter().enumerate() {
        let x0 = PAD + g as f64 * group + group * 0.1;
        for (s, (_, values)) in series.iter().enumerate() {
            let v = values.get(g).copied().unwrap_or(0.0);
            let h = plot_h * v / max;
            let _ = writeln!(
                svg,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{v:.4e}</title></rect>",
                x0 + s as f64 * bar,
                H - PAD - h,
                bar * 0.95,
                h,
                COLORS[s % COLORS.len()]
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            x0 + group * 0.4,
            H - PAD + 16.0,
            escape(label)
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">{}</text>",
        H / 2.0,
        H / 2.0,
        escape(y_label)
    );
    let _ = writeln!(
        svg,
        "<text x=\"{PAD}\" y=\"{}\">max {max:.3e}</text>",
        PAD + 10.0
    );
    legend(
        &mut svg,
        &series.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
    );
    svg + "</svg>\n"
}

/// Histograms over `[0, 1]` (equal bins), drawn as overlaid outlines.
pub fn histograms(title: &str, series: &[(&str, &[usize])]) -> String {
    let mut svg = header(title);
    let bins = series
        .iter()
        .map(|(_, h)| h.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let max = series
        .iter()
        .flat_map(|(_, h)| h.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let width = (W - 1.5 * PAD) / bins as f64;
    let plot_h = H - 2.0 * PAD - 16.0;
    for (s, (_, counts)) in series.iter().enumerate() {
        for (i, &c) in counts.iter().enumerate() {
            let h = plot_h * c as f64 / max;
            let _ = writeln!(
                svg,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\" fill-opacity=\"0.45\" stroke=\"{}\"><title>{c}</title></rect>",
                PAD + i as f64 * width,
                H - PAD - h,
                width,
                h,
                COLORS[s % COLORS.len()],
                COLORS[s % COLORS.len()]
            );
        }
    }
    for (t, label) in [(0.0, "0"), (0.5, "0.5"), (1.0, "1")] {
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
            PAD + t * width * bins as f64,
            H - PAD + 16.0
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">decimal h(alpha) (0: rounded down, 1: rounded up)</text>",
        W / 2.0,
        H - 12.0
    );
    legend(
        &mut svg,
        &series.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
    );
    svg + "</svg>\n"
}
