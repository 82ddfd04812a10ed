//! Minimum-cost assignment with a cost limit: which tracks take which detections, as ByteTrack's
//! `lapjv(cost, cost_limit)` decides it. A pair costing more than the limit is never made, and
//! leaving a track and a detection both unmatched costs the limit, so the result is the best
//! set of pairs under it (the Hungarian method, on a matrix extended to say so).

/// Pairs `(row, column)` of the rows x columns `cost` matrix (row-major) whose total cost is
/// least, each costing at most `limit`.
pub fn assign(cost: &[f64], rows: usize, columns: usize, limit: f64) -> Vec<(usize, usize)> {
    debug_assert_eq!(cost.len(), rows * columns);
    // A row or column with no pair under the limit stays unmatched whatever the rest does: the
    // matching runs on the others only (a frame's false positives far from every track, or
    // tracks lost far from every box, cost nothing).
    let live_rows: Vec<usize> = (0..rows).filter(|&r| (0..columns).any(|c| cost[r * columns + c] <= limit)).collect();
    let live_columns: Vec<usize> = (0..columns).filter(|&c| (0..rows).any(|r| cost[r * columns + c] <= limit)).collect();
    if live_rows.len() < rows || live_columns.len() < columns {
        let reduced: Vec<f64> = live_rows.iter().flat_map(|&r| live_columns.iter().map(move |&c| cost[r * columns + c])).collect();
        return assign(&reduced, live_rows.len(), live_columns.len(), limit).into_iter().map(|(r, c)| (live_rows[r], live_columns[c])).collect();
    }
    if rows == 0 || columns == 0 {
        return Vec::new();
    }
    // Rows are tracks then one dummy per detection; columns are detections then one dummy per
    // track. A track's own dummy, or a detection's, costs half the limit: leaving both unmatched
    // costs the limit.
    let n = rows + columns;
    let forbidden = limit * 4.0 + 1.0;
    let mut extended = vec![forbidden; n * n];
    for r in 0..n {
        for c in 0..n {
            extended[r * n + c] = match (r < rows, c < columns) {
                (true, true) => {
                    let value = cost[r * columns + c];
                    if value <= limit { value } else { forbidden }
                }
                (true, false) if c - columns == r => limit / 2.0,
                (false, true) if r - rows == c => limit / 2.0,
                (false, false) => 0.0,
                _ => forbidden,
            };
        }
    }
    hungarian(&extended, n).into_iter().enumerate().filter(|&(r, c)| r < rows && c < columns && cost[r * columns + c] <= limit).collect()
}

/// The column of each row in a least-cost perfect matching of a square matrix (the Hungarian
/// method with potentials, O(n³)).
fn hungarian(cost: &[f64], n: usize) -> Vec<usize> {
    // 1-based, with row/column 0 as the sentinel of the augmenting search.
    let mut u = vec![0.0; n + 1];
    let mut v = vec![0.0; n + 1];
    let mut row_of_column = vec![0usize; n + 1];
    let mut way = vec![0usize; n + 1];
    for row in 1..=n {
        row_of_column[0] = row;
        let mut column = 0;
        let mut min_slack = vec![f64::INFINITY; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[column] = true;
            let current_row = row_of_column[column];
            let mut delta = f64::INFINITY;
            let mut next = 0;
            for c in 1..=n {
                if used[c] {
                    continue;
                }
                let slack = cost[(current_row - 1) * n + (c - 1)] - u[current_row] - v[c];
                if slack < min_slack[c] {
                    min_slack[c] = slack;
                    way[c] = column;
                }
                if min_slack[c] < delta {
                    delta = min_slack[c];
                    next = c;
                }
            }
            for c in 0..=n {
                if used[c] {
                    u[row_of_column[c]] += delta;
                    v[c] -= delta;
                } else {
                    min_slack[c] -= delta;
                }
            }
            column = next;
            if row_of_column[column] == 0 {
                break;
            }
        }
        while column != 0 {
            let previous = way[column];
            row_of_column[column] = row_of_column[previous];
            column = previous;
        }
    }
    let mut column_of_row = vec![0; n];
    for c in 1..=n {
        column_of_row[row_of_column[c] - 1] = c - 1;
    }
    column_of_row
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The least total cost over every set of pairs under the limit, by trying them all.
    fn brute_force(cost: &[f64], rows: usize, columns: usize, limit: f64) -> f64 {
        fn go(row: usize, taken: &mut Vec<bool>, cost: &[f64], rows: usize, columns: usize, limit: f64) -> f64 {
            if row == rows {
                return taken.iter().filter(|t| !**t).count() as f64 * limit / 2.0;
            }
            let mut best = limit / 2.0 + go(row + 1, taken, cost, rows, columns, limit);
            for c in 0..columns {
                let value = cost[row * columns + c];
                if !taken[c] && value <= limit {
                    taken[c] = true;
                    best = best.min(value + go(row + 1, taken, cost, rows, columns, limit));
                    taken[c] = false;
                }
            }
            best
        }
        go(0, &mut vec![false; columns], cost, rows, columns, limit)
    }

    fn total(pairs: &[(usize, usize)], cost: &[f64], rows: usize, columns: usize, limit: f64) -> f64 {
        let matched: f64 = pairs.iter().map(|&(r, c)| cost[r * columns + c]).sum();
        matched + (rows + columns - 2 * pairs.len()) as f64 * limit / 2.0
    }

    #[test]
    fn matches_the_best_assignment_found_by_trying_every_one() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut random = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        for case in 0..300 {
            let (rows, columns) = (case % 5, (case / 5) % 6);
            let cost: Vec<f64> = (0..rows * columns).map(|_| random()).collect();
            let limit = 0.8;
            let pairs = assign(&cost, rows, columns, limit);
            let mut rows_seen: Vec<usize> = pairs.iter().map(|p| p.0).collect();
            let mut columns_seen: Vec<usize> = pairs.iter().map(|p| p.1).collect();
            rows_seen.dedup();
            columns_seen.sort_unstable();
            columns_seen.dedup();
            assert_eq!((rows_seen.len(), columns_seen.len()), (pairs.len(), pairs.len()), "each row and column at most once");
            assert!(pairs.iter().all(|&(r, c)| cost[r * columns + c] <= limit));
            let best = brute_force(&cost, rows, columns, limit);
            assert!((total(&pairs, &cost, rows, columns, limit) - best).abs() < 1e-9, "case {case}: {pairs:?}");
        }
    }

    #[test]
    fn a_pair_over_the_limit_is_never_made() {
        assert!(assign(&[0.9], 1, 1, 0.8).is_empty());
        assert_eq!(assign(&[0.1, 0.3, 0.2, 0.9], 2, 2, 0.8), [(0, 1), (1, 0)], "two pairs beat the cheapest one alone");
    }
}
