//! Hierarchical clustering of weight vectors: pairwise distances, average linkage, cuts.
//!
//! Models fine-tuned from one base sit close together; bases sit far apart. Average linkage
//! (UPGMA) merges the closest clusters first, so the merges inside trees come before the merges
//! between them, and cutting the dendrogram below the first between-tree merge recovers the
//! trees. The merges are found with the nearest-neighbour chain algorithm: O(n²) time and
//! memory for n models, where the textbook loop is O(n³).

/// One merge of the dendrogram: the clusters holding points `a` and `b` join at `height`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Merge {
    /// A point of the first cluster.
    pub a: usize,
    /// A point of the second cluster.
    pub b: usize,
    /// The average distance between the two clusters' points.
    pub height: f64,
}

/// Euclidean distances between the `n` rows of `x` (`[n, d]`, row-major), as a full `n x n`
/// matrix. One f64 matrix product of the centred rows (`|a-b|² = |a|² + |b|² - 2a·b`): the
/// product runs at BLAS speed, and centring plus f64 keeps the small distances between
/// siblings of one base exact to far below their size.
pub fn pairwise_distances(x: &[f32], n: usize, d: usize) -> Vec<f64> {
    assert_eq!(x.len(), n * d, "rows must be n x d");
    if n == 0 {
        return Vec::new();
    }
    let mut mean = vec![0.0f64; d];
    for row in x.chunks_exact(d.max(1)) {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let c: Vec<f64> = x
        .chunks_exact(d.max(1))
        .flat_map(|row| row.iter().zip(&mean).map(|(&v, &m)| v as f64 - m))
        .collect();
    let gram = probex_weights::gemm::product(&c, false, &c, true, [n, d, n]);
    let mut m = vec![0.0; n * n];
    for i in 0..n {
        for j in i + 1..n {
            let d2 = gram[i * n + i] + gram[j * n + j] - 2.0 * gram[i * n + j];
            let v = d2.max(0.0).sqrt();
            m[i * n + j] = v;
            m[j * n + i] = v;
        }
    }
    m
}

/// The squared Euclidean distance of two equally long vectors.
pub fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    let mut total = 0.0f64;
    for (ca, cb) in a.chunks(1024).zip(b.chunks(1024)) {
        // Eight independent lanes vectorise; each block is summed in f64.
        let mut lanes = [0.0f32; 8];
        let (ha, ta) = ca.split_at(ca.len() / 8 * 8);
        let (hb, tb) = cb.split_at(ha.len());
        for (xa, xb) in ha.chunks_exact(8).zip(hb.chunks_exact(8)) {
            for l in 0..8 {
                let t = xa[l] - xb[l];
                lanes[l] += t * t;
            }
        }
        let tail: f32 = ta.iter().zip(tb).map(|(p, q)| (p - q) * (p - q)).sum();
        total += lanes.iter().map(|&v| v as f64).sum::<f64>() + tail as f64;
    }
    total
}

/// The merges of average-linkage clustering of `n` points with distance matrix `dist`
/// (`n x n`), sorted by height (ties keep the order they were found in). `n - 1` merges.
pub fn average_linkage(mut dist: Vec<f64>, n: usize) -> Vec<Merge> {
    assert_eq!(dist.len(), n * n, "distances must be n x n");
    let mut active = vec![true; n];
    let mut size = vec![1usize; n];
    let mut merges = Vec::with_capacity(n.saturating_sub(1));
    let mut chain: Vec<usize> = Vec::new();
    let mut remaining = n;
    while remaining > 1 {
        if chain.is_empty() {
            chain.push(active.iter().position(|&a| a).unwrap_or(0));
        }
        // Grow the chain until its last two links are each other's nearest neighbours.
        let (a, b) = loop {
            let a = chain[chain.len() - 1];
            let prev = (chain.len() >= 2).then(|| chain[chain.len() - 2]);
            // The previous link wins ties, which guarantees termination.
            let mut best = prev.map(|p| (p, dist[a * n + p]));
            for k in 0..n {
                if !active[k] || k == a {
                    continue;
                }
                let d = dist[a * n + k];
                if best.is_none_or(|(_, bd)| d < bd) {
                    best = Some((k, d));
                }
            }
            let Some((b, _)) = best else {
                unreachable!("at least two clusters are active")
            };
            if Some(b) == prev {
                chain.pop();
                chain.pop();
                break (a, b);
            }
            chain.push(b);
        };
        let height = dist[a * n + b];
        // Lance-Williams update for average linkage; the merged cluster lives in slot `b`.
        let (sa, sb) = (size[a] as f64, size[b] as f64);
        for k in 0..n {
            if active[k] && k != a && k != b {
                let d = (sa * dist[a * n + k] + sb * dist[b * n + k]) / (sa + sb);
                dist[b * n + k] = d;
                dist[k * n + b] = d;
            }
        }
        active[a] = false;
        size[b] += size[a];
        merges.push(Merge { a, b, height });
        remaining -= 1;
    }
    merges.sort_by(|x, y| x.height.total_cmp(&y.height));
    merges
}

/// Cluster labels of `n` points after applying the first `apply` of `merges` (sorted by
/// height): labels count from 0 in order of each cluster's first point.
pub fn cut(n: usize, merges: &[Merge], apply: usize) -> Vec<usize> {
    let mut parent: Vec<usize> = (0..n).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    for m in merges.iter().take(apply) {
        let (ra, rb) = (root(&mut parent, m.a), root(&mut parent, m.b));
        if ra != rb {
            parent[ra.max(rb)] = ra.min(rb);
        }
    }
    let mut label_of_root = vec![usize::MAX; n];
    let mut next = 0;
    (0..n)
        .map(|i| {
            let r = root(&mut parent, i);
            if label_of_root[r] == usize::MAX {
                label_of_root[r] = next;
                next += 1;
            }
            label_of_root[r]
        })
        .collect()
}

/// Mean silhouette of the clustering `labels` (from [`cut`]) under `dist` (`n x n`): for each
/// point `(b - a) / max(a, b)`, with `a` its mean distance to the rest of its cluster and `b`
/// its mean distance to the nearest other cluster; 0 for a point alone in its cluster. Near 1:
/// tight clusters far apart; near 0: no cluster structure. O(n²).
pub fn silhouette(dist: &[f64], labels: &[usize]) -> f64 {
    let n = labels.len();
    let k = labels.iter().max().map_or(0, |&l| l + 1);
    if n == 0 || k < 2 {
        return 0.0;
    }
    let mut size = vec![0usize; k];
    for &l in labels {
        size[l] += 1;
    }
    let mut sums = vec![0.0f64; k];
    let mut total = 0.0;
    for (i, &own) in labels.iter().enumerate() {
        if size[own] < 2 {
            continue;
        }
        sums.fill(0.0);
        for (&d, &l) in dist[i * n..(i + 1) * n].iter().zip(labels) {
            sums[l] += d;
        }
        let a = sums[own] / (size[own] - 1) as f64;
        let b = (0..k)
            .filter(|&c| c != own)
            .map(|c| sums[c] / size[c] as f64)
            .fold(f64::INFINITY, f64::min);
        let m = a.max(b);
        if m > 0.0 {
            total += (b - a) / m;
        }
    }
    total / n as f64
}

/// The cut of the dendrogram `merges` of `n` points (distances `dist`) with the highest mean
/// [`silhouette`] among 2 to `max_clusters` clusters, as (merges applied, silhouette); the
/// fewer clusters win ties. `None` below 3 points, where no cut can be judged.
pub fn best_silhouette_cut(
    dist: &[f64],
    merges: &[Merge],
    n: usize,
    max_clusters: usize,
) -> Option<(usize, f64)> {
    let top = max_clusters.min(n.saturating_sub(1));
    let mut best: Option<(usize, f64)> = None;
    for k in 2..=top {
        let apply = n - k;
        let score = silhouette(dist, &cut(n, merges, apply));
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((apply, score));
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(centres: &[(f32, f32)], per: usize, spread: f32) -> Vec<f32> {
        let mut x = Vec::new();
        let mut s = 1u32;
        for &(cx, cy) in centres {
            for _ in 0..per {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let u = (s >> 8) as f32 / (1 << 24) as f32 - 0.5;
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let v = (s >> 8) as f32 / (1 << 24) as f32 - 0.5;
                x.extend([cx + spread * u, cy + spread * v]);
            }
        }
        x
    }

    #[test]
    fn distances_are_euclidean_and_symmetric() {
        let x = [0.0, 0.0, 3.0, 4.0, 6.0, 8.0];
        let d = pairwise_distances(&x, 3, 2);
        let want = [0.0, 5.0, 10.0, 5.0, 0.0, 5.0, 10.0, 5.0, 0.0];
        for (a, b) in d.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{d:?}");
        }
    }

    #[test]
    fn pairwise_distances_of_near_twins_far_from_the_origin_are_exact() {
        // Two vectors of 1e5 weights near 1000 that differ by 1e-3 each: distance 0.316.
        let a = vec![1000.0f32; 100_000];
        let b: Vec<f32> = a.iter().map(|v| v + 0.001).collect();
        let want = squared_distance(&a, &b).sqrt();
        let x: Vec<f32> = a.iter().chain(&b).copied().collect();
        let d = pairwise_distances(&x, 2, 100_000);
        assert!((d[1] - want).abs() / want < 1e-9, "{} vs {want}", d[1]);
    }

    #[test]
    fn long_vectors_keep_small_differences() {
        // 1e6 weights near 1000 that differ by 1e-3 each: f32 sums of squares would drift.
        let a = vec![1000.0f32; 1_000_003];
        let b: Vec<f32> = a.iter().map(|v| v + 0.001).collect();
        let d2 = squared_distance(&a, &b);
        let exact: f64 = a
            .iter()
            .zip(&b)
            .map(|(p, q)| ((q - p) as f64).powi(2))
            .sum();
        assert!((d2 - exact).abs() / exact < 1e-5, "{d2} vs {exact}");
    }

    #[test]
    fn average_linkage_matches_the_textbook_definition() {
        // Four points on a line: 0, 1, 5, 11. Average linkage merges {0,1} at 1, then
        // {0,1}+{5} at (5+4)/2 = 4.5, then everything with {11} at (11+10+6)/3 = 9.
        let x = [0.0f32, 1.0, 5.0, 11.0];
        let m = average_linkage(pairwise_distances(&x, 4, 1), 4);
        let h: Vec<f64> = m.iter().map(|m| m.height).collect();
        assert_eq!(h, vec![1.0, 4.5, 9.0]);
        assert_eq!(cut(4, &m, 1), vec![0, 0, 1, 2]);
        assert_eq!(cut(4, &m, 2), vec![0, 0, 0, 1]);
        assert_eq!(cut(4, &m, 3), vec![0, 0, 0, 0]);
    }

    /// The cut `best_silhouette_cut` picks for `x` (`n` points of `d` values), as a count of
    /// clusters and the silhouette.
    fn auto_cut(x: &[f32], n: usize, d: usize) -> (usize, f64) {
        let dist = pairwise_distances(x, n, d);
        let m = average_linkage(dist.clone(), n);
        let (apply, s) = best_silhouette_cut(&dist, &m, n, 16).expect("a cut");
        (n - apply, s)
    }

    #[test]
    fn silhouette_matches_the_definition() {
        // Points 0, 1 | 10, 12 on a line. Point 1: a = 1, b = (9 + 11) / 2 = 10, s = 9/10.
        let x = [0.0f32, 1.0, 10.0, 12.0];
        let dist = pairwise_distances(&x, 4, 1);
        let want = [10.0 / 11.0, 9.0 / 10.0, 1.0 - 2.0 / 9.5, 1.0 - 2.0 / 11.5];
        let s = silhouette(&dist, &[0, 0, 1, 1]);
        assert!((s - want.iter().sum::<f64>() / 4.0).abs() < 1e-12, "{s}");
        // A singleton scores 0; one cluster has no silhouette.
        let s1 = silhouette(&dist, &[0, 0, 0, 1]);
        assert!(s1 < s);
        assert_eq!(silhouette(&dist, &[0, 0, 0, 0]), 0.0);
    }

    #[test]
    fn three_separated_groups_are_found_by_the_silhouette() {
        let x = points(&[(0.0, 0.0), (50.0, 0.0), (0.0, 80.0)], 20, 1.0);
        let n = 60;
        let (k, s) = auto_cut(&x, n, 2);
        assert_eq!(k, 3);
        assert!(s > 0.9, "{s}");
        let dist = pairwise_distances(&x, n, 2);
        let m = average_linkage(dist, n);
        let labels = cut(n, &m, n - 3);
        for (i, &l) in labels.iter().enumerate() {
            assert_eq!(l, i / 20, "point {i}");
        }
    }

    #[test]
    fn far_siblings_do_not_hide_the_trees() {
        // What the old largest-jump rule missed on a mini tree: three groups (spread 1, 12
        // apart), each with two members 5 out along a direction of its own. Their late merges
        // fill the jump in merge heights below the between-group merges, but the silhouette
        // still peaks at three groups.
        let centres = [(0.0, 0.0), (12.0, 0.0), (0.0, 12.0)];
        let d = 5;
        let mut x: Vec<f32> = points(&centres, 20, 1.0)
            .chunks(2)
            .flat_map(|p| [p[0], p[1], 0.0, 0.0, 0.0])
            .collect();
        for (g, &(cx, cy)) in centres.iter().enumerate() {
            for sign in [5.0, -5.0] {
                let mut p = [cx, cy, 0.0, 0.0, 0.0];
                p[2 + g] = sign;
                x.extend(p);
            }
        }
        let n = x.len() / d;
        let dist = pairwise_distances(&x, n, d);
        let m = average_linkage(dist, n);
        let h: Vec<f64> = m.iter().map(|m| m.height).collect();
        let (within, between) = (h[n - 4], h[n - 3]);
        assert!(between / within < 3.0, "the jump is {}", between / within);
        let (k, s) = auto_cut(&x, n, d);
        assert_eq!(k, 3, "silhouette {s}");
        let labels = cut(n, &m, n - 3);
        for g in 0..3 {
            let group = &labels[g * 20..(g + 1) * 20];
            assert!(group.iter().all(|&l| l == group[0]), "group {g}: {group:?}");
            assert_eq!(
                labels[60 + 2 * g],
                group[0],
                "first far member of group {g}"
            );
            assert_eq!(
                labels[61 + 2 * g],
                group[0],
                "second far member of group {g}"
            );
        }
    }

    #[test]
    fn one_group_scores_low() {
        let x = points(&[(0.0, 0.0)], 40, 1.0);
        let (_, s) = auto_cut(&x, 40, 2);
        assert!(s < 0.5, "a uniform square scores {s}");
    }

    #[test]
    fn identical_points_are_perfectly_separated() {
        let mut x = vec![0.0f32; 10];
        x.extend([100.0f32; 10]);
        let (k, s) = auto_cut(&x, 20, 1);
        assert_eq!((k, s), (2, 1.0));
    }
}
