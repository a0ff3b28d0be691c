//! Rail distances from a station table: each line's stations in order with their distance
//! along the line, and the shortest way through the network between two stations, changing
//! lines where two lines share a station (by name). Fares by distance band use it for every
//! trip whose two ends the table lists; other trips keep the per-stop estimate.

use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// One rail line: its stations in order, each with its distance (km) from the line's first.
/// A gate's `stop` n is the line's n-th station, counted from 1.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StationLine {
    pub line: u16,
    pub name: String,
    pub stations: Vec<(String, f64)>,
}

/// A station of the network: the line's place in the table and the station's place on it.
type Node = (usize, usize);

/// A place on the way, ordered so that the heap gives the nearest first.
#[derive(PartialEq)]
struct Reached {
    km: f64,
    node: Node,
}

impl Eq for Reached {}

impl Ord for Reached {
    fn cmp(&self, other: &Self) -> Ordering {
        other.km.total_cmp(&self.km)
    }
}

impl PartialOrd for Reached {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn find(lines: &[StationLine], line: u16, stop: u16) -> Option<Node> {
    let l = lines.iter().position(|l| l.line == line)?;
    let s = usize::from(stop).checked_sub(1)?;
    (s < lines[l].stations.len()).then_some((l, s))
}

/// The shortest distance (km) through the network between two stops, or `None` when the table
/// does not list both.
pub fn network_km(lines: &[StationLine], from: (u16, u16), to: (u16, u16)) -> Option<f64> {
    let start = find(lines, from.0, from.1)?;
    let goal = find(lines, to.0, to.1)?;
    shortest_from(lines, start).get(&goal).copied()
}

/// The shortest distance from one station to every station it reaches (Dijkstra's search).
fn shortest_from(lines: &[StationLine], start: Node) -> HashMap<Node, f64> {
    let mut same_station: HashMap<&str, Vec<Node>> = HashMap::new();
    for (l, line) in lines.iter().enumerate() {
        for (s, (name, _)) in line.stations.iter().enumerate() {
            same_station.entry(name).or_default().push((l, s));
        }
    }
    let mut best: HashMap<Node, f64> = HashMap::from([(start, 0.0)]);
    let mut heap = BinaryHeap::from([Reached {
        km: 0.0,
        node: start,
    }]);
    while let Some(Reached { km, node }) = heap.pop() {
        if best.get(&node).is_some_and(|b| *b < km) {
            continue;
        }
        let (l, s) = node;
        let stations = &lines[l].stations;
        let along = [
            s.checked_sub(1),
            Some(s + 1).filter(|n| *n < stations.len()),
        ]
        .into_iter()
        .flatten()
        .map(|n| ((l, n), (stations[n].1 - stations[s].1).abs()));
        let change = same_station[stations[s].0.as_str()]
            .iter()
            .filter(|other| **other != node)
            .map(|other| (*other, 0.0));
        for (next, step) in along.chain(change) {
            let reached = km + step;
            if best.get(&next).is_none_or(|b| reached < *b) {
                best.insert(next, reached);
                heap.push(Reached {
                    km: reached,
                    node: next,
                });
            }
        }
    }
    best
}

/// Every stop's distance to every other, computed once per table: pricing a trip is then a
/// lookup, whatever the size of the network.
#[derive(Debug)]
pub struct Network {
    index: HashMap<(u16, u16), usize>,
    km: Vec<f64>,
}

impl Network {
    pub fn of(lines: &[StationLine]) -> Self {
        let nodes: Vec<Node> = lines
            .iter()
            .enumerate()
            .flat_map(|(l, line)| (0..line.stations.len()).map(move |s| (l, s)))
            .collect();
        let n = nodes.len();
        let at: HashMap<Node, usize> = nodes.iter().enumerate().map(|(i, v)| (*v, i)).collect();
        let mut km = vec![f64::INFINITY; n * n];
        for (i, from) in nodes.iter().enumerate() {
            for (to, d) in shortest_from(lines, *from) {
                km[i * n + at[&to]] = d;
            }
        }
        // A stop is the line's number and the station's place on it from 1; the table's
        // checks keep that within u16.
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, (l, s))| ((lines[*l].line, (s + 1) as u16), i))
            .collect();
        Self { index, km }
    }

    /// The shortest distance between two stops, or `None` when the table does not list both.
    pub fn km(&self, from: (u16, u16), to: (u16, u16)) -> Option<f64> {
        let (i, j) = (self.index.get(&from)?, self.index.get(&to)?);
        Some(self.km[i * self.index.len() + j]).filter(|d| d.is_finite())
    }
}

/// A table's [`Network`], made at its first use. It is not part of the table: two tables are
/// equal, and serialize alike, whether or not it was made yet.
#[derive(Debug, Default)]
pub struct NetworkCache(std::sync::OnceLock<Network>);

impl NetworkCache {
    pub fn get(&self, lines: &[StationLine]) -> &Network {
        self.0.get_or_init(|| Network::of(lines))
    }
}

impl Clone for NetworkCache {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for NetworkCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// What is wrong with a station table, each as `key: why`.
pub fn problems(lines: &[StationLine]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let key = format!("metro.lines[{i}] (line {})", line.line);
        if lines[..i].iter().any(|l| l.line == line.line) {
            out.push(format!("{key}: the line is listed twice"));
        }
        if line.stations.len() < 2 || line.stations.len() > usize::from(u16::MAX) {
            out.push(format!("{key}: a line has 2 to 65535 stations"));
        }
        if line.stations.first().is_some_and(|(_, km)| *km != 0.0) {
            out.push(format!("{key}: the first station is at 0 km"));
        }
        if line
            .stations
            .iter()
            .any(|(name, km)| name.trim().is_empty() || !km.is_finite())
        {
            out.push(format!(
                "{key}: every station has a name and a distance in km"
            ));
        }
        if line.stations.windows(2).any(|w| w[0].1 >= w[1].1) {
            out.push(format!(
                "{key}: distances grow along the line, station by station"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fares::FareTables;

    fn shipped() -> Vec<StationLine> {
        FareTables::embedded_default().metro.lines
    }

    fn stop(lines: &[StationLine], line: u16, name: &str) -> (u16, u16) {
        let l = lines.iter().find(|l| l.line == line).unwrap();
        let s = l.stations.iter().position(|(n, _)| n == name).unwrap();
        (line, u16::try_from(s + 1).unwrap())
    }

    /// A station's distance along its line, as the shipped table has it.
    fn km(lines: &[StationLine], line: u16, name: &str) -> f64 {
        let l = lines.iter().find(|l| l.line == line).unwrap();
        l.stations.iter().find(|(n, _)| n == name).unwrap().1
    }

    #[test]
    fn along_one_line_the_distance_is_the_difference_of_positions() {
        let lines = shipped();
        let found = network_km(&lines, stop(&lines, 2, "大坪"), stop(&lines, 2, "鱼洞")).unwrap();
        let along = km(&lines, 2, "鱼洞") - km(&lines, 2, "大坪");
        assert!((found - along).abs() < 1e-9, "{found} {along}");
    }

    #[test]
    fn between_lines_the_shortest_way_changes_where_the_lines_meet() {
        let lines = shipped();
        let d = |a: (u16, &str), b: (u16, &str)| {
            network_km(&lines, stop(&lines, a.0, a.1), stop(&lines, b.0, b.1)).unwrap()
        };
        let k = |line, name| km(&lines, line, name);
        // 朝天门 to 鱼洞 changes at 大坪, shorter than at 较场口.
        let via_daping = k(1, "大坪") + (k(2, "鱼洞") - k(2, "大坪"));
        let via_jiaochangkou = k(1, "较场口") + k(2, "鱼洞");
        assert!(via_daping < via_jiaochangkou);
        assert!((d((1, "朝天门"), (2, "鱼洞")) - via_daping).abs() < 1e-9);
        // Between two stations of line 2, the way through line 1 is shorter: line 2 follows
        // the river from 较场口 to 大坪.
        let via_line_1 = (k(1, "大坪") - k(1, "较场口")) + (k(2, "鱼洞") - k(2, "大坪"));
        assert!(via_line_1 < k(2, "鱼洞"));
        assert!((d((2, "较场口"), (2, "鱼洞")) - via_line_1).abs() < 1e-9);
        // One station, two lines: no distance.
        assert_eq!(d((1, "较场口"), (2, "较场口")), 0.0);
        // 小什字 to 临江门 changes at 较场口.
        let via = (k(1, "较场口") - k(1, "小什字")) + k(2, "临江门");
        assert!((d((1, "小什字"), (2, "临江门")) - via).abs() < 1e-9);
    }

    #[test]
    fn the_precomputed_network_agrees_with_the_search() {
        let lines = shipped();
        let network = Network::of(&lines);
        for from in [(1, 1), (1, 7), (2, 1), (2, 25)] {
            for to in [(1, 24), (2, 9), (2, 13), (1, 3)] {
                assert_eq!(
                    network.km(from, to),
                    network_km(&lines, from, to),
                    "{from:?} {to:?}"
                );
            }
        }
        assert_eq!(network.km((2, 26), (2, 1)), None);
    }

    #[test]
    fn a_stop_the_table_does_not_list_has_no_table_distance() {
        let lines = shipped();
        assert_eq!(network_km(&lines, (2, 1), (2, 26)), None);
        assert_eq!(network_km(&lines, (2, 0), (2, 3)), None);
        assert_eq!(network_km(&lines, (9, 1), (2, 3)), None);
    }

    #[test]
    fn a_table_out_of_order_or_doubled_is_refused() {
        let mut lines = shipped();
        assert!(problems(&lines).is_empty(), "{:?}", problems(&lines));
        lines[0].stations.swap(1, 2);
        lines.push(lines[1].clone());
        let found = problems(&lines);
        assert!(
            found.iter().any(|p| p.contains("grow along the line")),
            "{found:?}"
        );
        assert!(
            found.iter().any(|p| p.contains("listed twice")),
            "{found:?}"
        );
    }
}
