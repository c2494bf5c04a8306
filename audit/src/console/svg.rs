//! Inline SVG drawn on the server: a privacy ledger over time with its caps, and a lineage graph.
//! Geometry only; the templates write the elements (presentation attributes, no `style`, so the
//! strict CSP holds).

use super::format::{epsilon, utc_millis};

/// A line chart of ε over time.
#[derive(Clone, Debug, PartialEq)]
pub struct Chart {
    pub width: u32,
    pub height: u32,
    /// `x,y x,y ...` for a `<polyline>`.
    pub line: String,
    pub points: Vec<ChartPoint>,
    /// Horizontal lines: a cap and its label.
    pub caps: Vec<ChartLine>,
    /// y-axis ticks.
    pub ticks: Vec<ChartLine>,
    pub first_time: String,
    pub last_time: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChartPoint {
    pub x: f64,
    pub y: f64,
    pub title: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChartLine {
    pub y: f64,
    pub label: String,
}

const W: u32 = 640;
const H: u32 = 220;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 28.0;

/// The chart of `points` (unix ms, cumulative ε), oldest first, with `caps` (label, ε).
pub fn ledger_chart(points: &[(i64, f64)], caps: &[(String, f64)]) -> Chart {
    let max_eps = points
        .iter()
        .map(|p| p.1)
        .chain(caps.iter().map(|c| c.1))
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let top = if max_eps > 0.0 { max_eps * 1.1 } else { 1.0 };
    let (t0, t1) = match (points.first(), points.last()) {
        (Some(a), Some(b)) => (a.0, b.0),
        _ => (0, 0),
    };
    let plot_w = f64::from(W) - LEFT - RIGHT;
    let plot_h = f64::from(H) - TOP - BOTTOM;
    let x_of = |i: usize, t: i64| {
        if t1 > t0 {
            LEFT + plot_w * (t - t0) as f64 / (t1 - t0) as f64
        } else if points.len() > 1 {
            LEFT + plot_w * i as f64 / (points.len() - 1) as f64
        } else {
            LEFT + plot_w / 2.0
        }
    };
    let y_of = |v: f64| TOP + plot_h * (1.0 - (v / top).clamp(0.0, 1.0));
    // A chart is a few hundred pixels wide, a ledger may hold tens of thousands of spends: per
    // pixel column the line keeps the first, lowest, highest and last point (what a line through
    // all of them would draw there), and one marker (the column's last, newest ε) carries a
    // title. Formatting and writing every point made the page cost ~20 ms per thousand spends.
    let xy: Vec<(f64, f64)> = points
        .iter()
        .enumerate()
        .map(|(i, &(t, v))| (round1(x_of(i, t)), round1(y_of(v))))
        .collect();
    let mut kept: Vec<usize> = Vec::new();
    let mut markers: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < xy.len() {
        let column = xy[i].0.round() as i64;
        let mut j = i;
        let (mut lowest, mut highest) = (i, i);
        while j + 1 < xy.len() && xy[j + 1].0.round() as i64 == column {
            j += 1;
            if xy[j].1 > xy[lowest].1 {
                lowest = j;
            }
            if xy[j].1 < xy[highest].1 {
                highest = j;
            }
        }
        let mut in_column = [i, lowest, highest, j];
        in_column.sort_unstable();
        for k in in_column {
            if kept.last() != Some(&k) {
                kept.push(k);
            }
        }
        markers.push(j);
        i = j + 1;
    }
    let pts: Vec<ChartPoint> = markers
        .iter()
        .map(|&k| ChartPoint {
            x: xy[k].0,
            y: xy[k].1,
            title: format!("ε {} at {}", epsilon(points[k].1), utc_millis(points[k].0)),
        })
        .collect();
    let line = kept
        .iter()
        .map(|&k| format!("{},{}", xy[k].0, xy[k].1))
        .collect::<Vec<_>>()
        .join(" ");
    let ticks = (0..=4)
        .map(|i| {
            let v = top * f64::from(i) / 4.0;
            ChartLine {
                y: round1(y_of(v)),
                label: epsilon(v),
            }
        })
        .collect();
    Chart {
        width: W,
        height: H,
        line,
        points: pts,
        caps: caps
            .iter()
            .map(|(label, v)| ChartLine {
                y: round1(y_of(*v)),
                label: format!("{label}: ε {}", epsilon(*v)),
            })
            .collect(),
        ticks,
        first_time: points.first().map(|p| utc_millis(p.0)).unwrap_or_default(),
        last_time: points.last().map(|p| utc_millis(p.0)).unwrap_or_default(),
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// A layered graph: columns of boxes, left to right, and edges between them.
#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    pub width: u32,
    pub height: u32,
    pub nodes: Vec<GraphNode>,
    pub edges: Vec<GraphEdge>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GraphNode {
    pub id: String,
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
    /// `base`, `round`, `site`, `approval`, `model`: the box's class.
    pub kind: &'static str,
    pub label: String,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GraphEdge {
    pub x1: f64,
    pub y1: f64,
    pub x2: f64,
    pub y2: f64,
}

/// One box to place: its column, kind, labels, and the ids of the boxes it comes from.
pub struct NodeSpec {
    pub id: String,
    pub column: usize,
    pub kind: &'static str,
    pub label: String,
    pub detail: String,
    pub from: Vec<String>,
}

const BOX_W: f64 = 190.0;
const BOX_H: f64 = 44.0;
const COL_GAP: f64 = 60.0;
const ROW_GAP: f64 = 14.0;
const MARGIN: f64 = 10.0;

/// Lays `specs` out in their columns, in the order given, and draws an edge from each box's
/// `from` boxes to it.
pub fn layered_graph(specs: &[NodeSpec]) -> Graph {
    let columns = specs.iter().map(|s| s.column + 1).max().unwrap_or(0);
    let mut rows_in = vec![0usize; columns];
    let mut nodes: Vec<GraphNode> = Vec::with_capacity(specs.len());
    for s in specs {
        let row = rows_in[s.column];
        rows_in[s.column] += 1;
        nodes.push(GraphNode {
            id: s.id.clone(),
            x: MARGIN + s.column as f64 * (BOX_W + COL_GAP),
            y: MARGIN + row as f64 * (BOX_H + ROW_GAP),
            w: BOX_W,
            h: BOX_H,
            kind: s.kind,
            label: s.label.clone(),
            detail: s.detail.clone(),
        });
    }
    let mut edges = Vec::new();
    for (s, n) in specs.iter().zip(&nodes) {
        for from in &s.from {
            if let Some(f) = nodes.iter().find(|m| &m.id == from) {
                // Within a column (one round to the next) the edge runs down; across columns,
                // from the right side of one box to the left side of the next.
                edges.push(if f.x == n.x {
                    GraphEdge {
                        x1: f.x + f.w / 2.0,
                        y1: f.y + f.h,
                        x2: n.x + n.w / 2.0,
                        y2: n.y,
                    }
                } else {
                    GraphEdge {
                        x1: f.x + f.w,
                        y1: f.y + f.h / 2.0,
                        x2: n.x,
                        y2: n.y + n.h / 2.0,
                    }
                });
            }
        }
    }
    let tallest = rows_in.iter().copied().max().unwrap_or(0);
    Graph {
        width: (2.0 * MARGIN + columns as f64 * (BOX_W + COL_GAP) - COL_GAP).max(0.0) as u32,
        height: (2.0 * MARGIN + tallest as f64 * (BOX_H + ROW_GAP)) as u32,
        nodes,
        edges,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_scales_time_and_epsilon_into_the_plot_and_draws_the_caps() {
        let c = ledger_chart(
            &[(1_000, 0.5), (2_000, 1.0), (3_000, 2.0)],
            &[("job j1 target".into(), 4.0)],
        );
        assert_eq!(c.points.len(), 3);
        assert_eq!(c.points[0].x, LEFT);
        assert_eq!(c.points[2].x, f64::from(W) - RIGHT);
        // Higher ε is higher up (smaller y); the cap is above every point.
        assert!(c.points[2].y < c.points[0].y);
        assert!(c.caps[0].y < c.points[2].y);
        assert_eq!(c.caps[0].label, "job j1 target: ε 4.00");
        assert_eq!(c.points[1].title, "ε 1.00 at 1970-01-01 00:00:02 UTC");
        let empty = ledger_chart(&[], &[]);
        assert!(empty.line.is_empty());
    }

    #[test]
    fn a_long_ledger_is_drawn_with_a_few_points_per_pixel_column_and_keeps_its_extremes() {
        // 20,000 spends, rising, with one dip: the line keeps the dip and both ends.
        let points: Vec<(i64, f64)> = (0..20_000i64)
            .map(|i| {
                (
                    i * 1_000,
                    if i == 10_000 { 0.0 } else { i as f64 / 1_000.0 },
                )
            })
            .collect();
        let c = ledger_chart(&points, &[]);
        let plot = (f64::from(W) - LEFT - RIGHT) as usize + 1;
        assert!(c.points.len() <= plot, "{} markers", c.points.len());
        let line: Vec<&str> = c.line.split(' ').collect();
        assert!(line.len() <= 4 * plot, "{} line points", line.len());
        assert_eq!(
            line.first(),
            Some(&format!("{},{}", LEFT, round1(TOP + (f64::from(H) - TOP - BOTTOM))).as_str())
        );
        assert_eq!(c.points.last().unwrap().x, f64::from(W) - RIGHT);
        assert_eq!(
            c.points.last().unwrap().title,
            format!("ε 20.00 at {}", utc_millis(19_999_000))
        );
        // The dip to 0 at the middle is on the line (y at the bottom of the plot).
        let bottom = round1(TOP + (f64::from(H) - TOP - BOTTOM));
        assert!(
            line[1..].iter().any(|p| p.ends_with(&format!(",{bottom}"))),
            "the dip is not drawn"
        );
    }

    #[test]
    fn the_graph_places_columns_left_to_right_and_links_boxes() {
        let spec = |id: &str, column, from: &[&str]| NodeSpec {
            id: id.into(),
            column,
            kind: "round",
            label: id.into(),
            detail: String::new(),
            from: from.iter().map(|s| s.to_string()).collect(),
        };
        let g = layered_graph(&[
            spec("base", 0, &[]),
            spec("r1", 1, &["base"]),
            spec("r2", 1, &["base", "r1"]),
        ]);
        assert_eq!(g.nodes.len(), 3);
        assert!(g.nodes[1].x > g.nodes[0].x);
        assert!(g.nodes[2].y > g.nodes[1].y);
        assert_eq!(g.edges.len(), 3);
        assert_eq!(g.edges[0].x1, g.nodes[0].x + g.nodes[0].w);
        // r1 -> r2, in one column, runs down from r1's bottom to r2's top.
        assert_eq!(
            (g.edges[2].y1, g.edges[2].y2),
            (g.nodes[1].y + g.nodes[1].h, g.nodes[2].y)
        );
    }
}
