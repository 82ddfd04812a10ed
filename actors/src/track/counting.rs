//! Counting lines and zones: when a track's anchor (the bottom centre of its box, where an
//! object stands) crosses a line, and when it enters or leaves a polygon. Coordinates are pixels
//! of the frame as displayed, as the detections' boxes are.

use std::collections::BTreeMap;

use serde::Serialize;

/// Lines or zones a request may name, and the points a zone may have.
pub const MAX_SHAPES: usize = 16;
pub const MAX_ZONE_POINTS: usize = 64;
/// Coordinates are pixels: a frame is at most this wide (`limits.max_width` is lower).
const MAX_COORDINATE: f32 = 100_000.0;

pub type Point = (f32, f32);

/// A counting line, from `a` to `b`. Crossing to the right-hand side of it, as seen walking from
/// `a` to `b`, is `in` (for a line drawn from left to right: downwards in the picture).
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub name: String,
    pub a: Point,
    pub b: Point,
}

/// A zone: a polygon, its points in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Zone {
    pub name: String,
    pub points: Vec<Point>,
}

/// Parses `lines=`: segments separated by `;`, each `[name:]x1,y1,x2,y2`. Unnamed lines are
/// `line1`, `line2`, … by position.
pub fn parse_lines(text: &str) -> Result<Vec<Line>, String> {
    parse_shapes(text, "line")?
        .into_iter()
        .map(|(name, points)| match points[..] {
            [a, b] if a != b => Ok(Line { name, a, b }),
            [_, _] => Err(format!("line {name:?} has two equal points")),
            _ => Err(format!("line {name:?} needs 4 numbers (x1,y1,x2,y2), not {}", points.len() * 2)),
        })
        .collect()
}

/// Parses `zones=`: polygons separated by `;`, each `[name:]x1,y1,x2,y2,x3,y3[,…]`. Unnamed
/// zones are `zone1`, `zone2`, … by position.
pub fn parse_zones(text: &str) -> Result<Vec<Zone>, String> {
    parse_shapes(text, "zone")?
        .into_iter()
        .map(|(name, points)| {
            if (3..=MAX_ZONE_POINTS).contains(&points.len()) {
                Ok(Zone { name, points })
            } else {
                Err(format!("zone {name:?} needs 3 to {MAX_ZONE_POINTS} points, not {}", points.len()))
            }
        })
        .collect()
}

fn parse_shapes(text: &str, kind: &str) -> Result<Vec<(String, Vec<Point>)>, String> {
    let parts: Vec<&str> = text.split(';').map(str::trim).filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err(format!("no {kind} given"));
    }
    if parts.len() > MAX_SHAPES {
        return Err(format!("at most {MAX_SHAPES} {kind}s"));
    }
    let mut shapes: Vec<(String, Vec<Point>)> = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let (name, numbers) = match part.split_once(':') {
            Some((name, numbers)) => (name.trim().to_string(), numbers),
            None => (format!("{kind}{}", i + 1), *part),
        };
        if name.is_empty() || name.len() > 32 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(format!("a {kind} name is 1 to 32 of A-Z, a-z, 0-9, - and _, not {name:?}"));
        }
        if shapes.iter().any(|(other, _)| *other == name) {
            return Err(format!("two {kind}s are named {name:?}"));
        }
        let values: Vec<f32> = numbers
            .split(',')
            .map(|v| v.trim().parse::<f32>().ok().filter(|v| v.is_finite() && v.abs() <= MAX_COORDINATE))
            .collect::<Option<_>>()
            .ok_or_else(|| format!("{kind} {name:?}: coordinates are numbers of pixels, comma-separated"))?;
        if !values.len().is_multiple_of(2) || values.len() > 2 * MAX_ZONE_POINTS {
            return Err(format!("{kind} {name:?}: an even number of coordinates, x then y"));
        }
        shapes.push((name, values.chunks(2).map(|p| (p[0], p[1])).collect()));
    }
    Ok(shapes)
}

/// Which way a track crossed a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    In,
    Out,
}

/// Whether a track came into a zone or left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ZoneAction {
    Enter,
    Exit,
}

/// The bottom centre of a box: where an object stands.
pub fn anchor(bbox: [f32; 4]) -> Point {
    ((bbox[0] + bbox[2]) / 2.0, bbox[3])
}

/// Which side of the line through `a` and `b` a point is on: positive on the right-hand side
/// walking from `a` to `b` (with y pointing down), zero on it.
fn side(a: Point, b: Point, p: Point) -> f32 {
    (b.0 - a.0) * (p.1 - a.1) - (b.1 - a.1) * (p.0 - a.0)
}

/// How the anchor's move from `from` to `to` crosses the segment, if it does. `from` is the
/// last anchor that was off the line, so that a track that stops on the line and goes on later
/// is counted once, when it leaves it on the other side.
pub fn crossing(line: &Line, from: Point, to: Point) -> Option<Direction> {
    let (before, after) = (side(line.a, line.b, from), side(line.a, line.b, to));
    if before == 0.0 || after == 0.0 || (before > 0.0) == (after > 0.0) {
        return None;
    }
    // The segment's ends must not both lie on one side of the move: it passed beside them.
    let (end_a, end_b) = (side(from, to, line.a), side(from, to, line.b));
    if (end_a > 0.0 && end_b > 0.0) || (end_a < 0.0 && end_b < 0.0) {
        return None;
    }
    Some(if after > 0.0 { Direction::In } else { Direction::Out })
}

/// Whether `p` is off the line through the segment: only then does it count as where a later
/// crossing starts.
pub fn off_line(line: &Line, p: Point) -> bool {
    side(line.a, line.b, p) != 0.0
}

/// Whether a point is inside a polygon (even-odd rule).
pub fn inside(points: &[Point], p: Point) -> bool {
    let mut inside = false;
    let mut j = points.len() - 1;
    for i in 0..points.len() {
        let (a, b) = (points[i], points[j]);
        if (a.1 > p.1) != (b.1 > p.1) && p.0 < (b.0 - a.0) * (p.1 - a.1) / (b.1 - a.1) + a.0 {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// Counts per class name.
pub type ClassCounts = BTreeMap<String, u64>;

/// A line's totals, as `end` reports them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LineTotals {
    pub name: String,
    #[serde(rename = "in")]
    pub into: ClassCounts,
    pub out: ClassCounts,
}

/// A zone's totals, as `end` reports them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ZoneTotals {
    pub name: String,
    /// Tracks that came into the zone (or were first seen in it), per class.
    pub entries: ClassCounts,
    /// The most tracks in the zone at one time.
    pub max_occupancy: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_zones_parse_with_and_without_names() {
        let lines = parse_lines("door:0,100,640,100; 10,0,10,50").unwrap();
        assert_eq!(lines[0], Line { name: "door".into(), a: (0.0, 100.0), b: (640.0, 100.0) });
        assert_eq!(lines[1].name, "line2");
        let zones = parse_zones("z:0,0,10,0,10,10").unwrap();
        assert_eq!(zones[0].points.len(), 3);
        for bad in ["", "1,2,3", "1,2,1,2", "a b:1,2,3,4", "x:1,2,3,nan", "1,2,3,4,5,6", "d:1,2,3,4;d:5,6,7,8", "1e9,0,0,0"] {
            assert!(parse_lines(bad).is_err(), "{bad:?}");
        }
        assert!(parse_zones("0,0,1,1").is_err());
        assert!(parse_lines(&vec!["0,0,1,1"; MAX_SHAPES + 1].join(";")).is_err());
    }

    #[test]
    fn a_crossing_has_the_direction_of_the_move() {
        // A horizontal line drawn left to right: moving down is `in`.
        let line = Line { name: "l".into(), a: (0.0, 100.0), b: (200.0, 100.0) };
        assert_eq!(crossing(&line, (50.0, 90.0), (52.0, 110.0)), Some(Direction::In));
        assert_eq!(crossing(&line, (50.0, 110.0), (52.0, 90.0)), Some(Direction::Out));
        assert_eq!(crossing(&line, (50.0, 90.0), (52.0, 95.0)), None, "no crossing");
        assert_eq!(crossing(&line, (250.0, 90.0), (250.0, 110.0)), None, "past the segment's end");
        assert_eq!(crossing(&line, (50.0, 90.0), (50.0, 100.0)), None, "ending on the line is not yet a crossing");
        assert!(!off_line(&line, (50.0, 100.0)) && off_line(&line, (50.0, 101.0)));
    }

    #[test]
    fn points_inside_a_polygon() {
        let square = [(0.0, 0.0), (10.0, 0.0), (10.0, 10.0), (0.0, 10.0)];
        assert!(inside(&square, (5.0, 5.0)));
        assert!(!inside(&square, (15.0, 5.0)));
        let l_shape = [(0.0, 0.0), (10.0, 0.0), (10.0, 4.0), (4.0, 4.0), (4.0, 10.0), (0.0, 10.0)];
        assert!(inside(&l_shape, (2.0, 8.0)) && !inside(&l_shape, (8.0, 8.0)));
    }
}
