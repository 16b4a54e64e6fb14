//! Small SVG charts (lines and points on linear axes), rendered in Rust so the HTML report needs
//! no script and no network. Output is deterministic for the same input.

use std::fmt::Write as _;

const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf",
];

/// One named series of (x, y) points.
pub(crate) struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Style {
    Lines,
    Points,
}

pub(crate) struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub series: Vec<Series>,
    pub style: Style,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Round tick step for a span (1, 2 or 5 times a power of ten).
fn tick_step(span: f64, target: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / target;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let m = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 1000.0 || v.fract().abs() < 1e-9 {
        format!("{:.0}", v)
    } else {
        format!("{:.2}", v)
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

impl Chart<'_> {
    pub fn render(&self) -> String {
        let (w, h) = (460.0, 282.0);
        let (l, r, t, b) = (58.0, 12.0, 26.0, 72.0);
        let pts: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .collect();
        let (mut x0, mut x1) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |a, p| (a.0.min(p.0), a.1.max(p.0)));
        let y1 = pts.iter().fold(f64::MIN, |a, p| a.max(p.1));
        if pts.is_empty() {
            x0 = 0.0;
            x1 = 1.0;
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let y0 = 0.0;
        let ystep = tick_step(if y1 > 0.0 { y1 } else { 1.0 }, 4.0);
        let ytop = (if y1 > 0.0 { y1 } else { 1.0 } / ystep).ceil() * ystep;
        let xstep = tick_step(x1 - x0, 5.0);
        let px = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - r);
        let py = |y: f64| h - b - (y - y0) / (ytop - y0) * (h - t - b);
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{title}" class="chart"><title>{title}</title><rect width="{w}" height="{h}" fill="white"/><text x="{cx}" y="16" text-anchor="middle" font-size="13" font-family="sans-serif">{title}</text>"#,
            title = esc(self.title),
            cx = w / 2.0
        );
        // Grid and ticks.
        let mut y = 0.0;
        while y <= ytop + ystep / 2.0 {
            let _ = write!(
                s,
                r##"<line x1="{l}" x2="{x2}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{tx}" y="{ty:.1}" text-anchor="end" font-size="10" font-family="sans-serif">{v}</text>"##,
                x2 = w - r,
                yy = py(y),
                tx = l - 4.0,
                ty = py(y) + 3.0,
                v = fmt_tick(y)
            );
            y += ystep;
        }
        let mut x = (x0 / xstep).ceil() * xstep;
        while x <= x1 + 1e-9 {
            let _ = write!(
                s,
                r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{y1}" y2="{y2}" stroke="#888"/><text x="{xx:.1}" y="{ty}" text-anchor="middle" font-size="10" font-family="sans-serif">{v}</text>"##,
                xx = px(x),
                y1 = h - b,
                y2 = h - b + 4.0,
                ty = h - b + 15.0,
                v = fmt_tick(x)
            );
            x += xstep;
        }
        let _ = write!(
            s,
            r##"<line x1="{l}" x2="{l}" y1="{t}" y2="{yb}" stroke="#444"/><line x1="{l}" x2="{xr}" y1="{yb}" y2="{yb}" stroke="#444"/><text x="{cx}" y="{xly}" text-anchor="middle" font-size="11" font-family="sans-serif">{xl}</text><text transform="translate(13,{cy}) rotate(-90)" text-anchor="middle" font-size="11" font-family="sans-serif">{yl}</text>"##,
            yb = h - b,
            xr = w - r,
            cx = (l + w - r) / 2.0,
            xly = h - b + 28.0,
            cy = (t + h - b) / 2.0,
            xl = esc(self.x_label),
            yl = esc(self.y_label)
        );
        for (i, se) in self.series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let good: Vec<&(f64, f64)> = se
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect();
            match self.style {
                Style::Lines if good.len() > 1 => {
                    let d: Vec<String> = good
                        .iter()
                        .map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1)))
                        .collect();
                    let _ = write!(
                        s,
                        r#"<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{}"/>"#,
                        d.join(" ")
                    );
                }
                _ => {
                    for p in &good {
                        let _ = write!(
                            s,
                            r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                            px(p.0),
                            py(p.1)
                        );
                    }
                }
            }
            // Legend below the axis label, left to right.
            let lx = l + (i as f64 % 3.0) * 130.0;
            let ly = h - 20.0 + (i / 3) as f64 * 12.0;
            let _ = write!(
                s,
                r#"<rect x="{lx}" y="{ry}" width="10" height="3" fill="{color}"/><text x="{tx}" y="{ly}" font-size="10" font-family="sans-serif">{name}</text>"#,
                ry = ly - 4.0,
                tx = lx + 14.0,
                name = esc(&se.name)
            );
        }
        s.push_str("</svg>");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_well_formed_svg_with_every_series() {
        let c = Chart {
            title: "a < b",
            x_label: "t (s)",
            y_label: "req/s",
            series: vec![
                Series {
                    name: "one".into(),
                    points: vec![(0.0, 1.0), (1.0, 3.0), (2.0, f64::NAN)],
                },
                Series {
                    name: "two".into(),
                    points: vec![],
                },
            ],
            style: Style::Lines,
        };
        let svg = c.render();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("a &lt; b"));
        assert!(svg.contains("<polyline"));
        assert!(svg.contains(">one<") && svg.contains(">two<"));
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn tick_steps_are_round() {
        assert_eq!(tick_step(10.0, 5.0), 2.0);
        assert_eq!(tick_step(180.0, 5.0), 50.0);
        assert_eq!(tick_step(0.9, 4.0), 0.5);
    }
}
