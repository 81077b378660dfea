//! The stages in a topological order (inputs first, file order otherwise), and the cycle
//! named when there is none.

use super::*;

/// Sorts `from` names into their typed slots and sorts stages topologically; a cycle is an
/// error that prints the whole cycle.
pub(super) fn order_stages(
    sources: &SourceMap,
    mut decls: Vec<StageDecl>,
) -> Result<Vec<StageDecl>, Diagnostics> {
    let outputs: BTreeMap<String, &'static str> =
        decls.iter().map(|d| (d.name.clone(), d.output)).collect();
    for d in &mut decls {
        for (up, _) in &d.from {
            let ty = outputs.get(up).copied().unwrap_or_default();
            if let Some((_, names)) = d.inputs.iter_mut().find(|(s, _)| s.ty == ty) {
                names.push(up.clone());
            }
        }
    }

    let mut graph = DiGraph::<usize, ()>::new();
    let idx: Vec<NodeIndex> = (0..decls.len()).map(|i| graph.add_node(i)).collect();
    let by_name: BTreeMap<&str, usize> = decls
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    for (i, d) in decls.iter().enumerate() {
        for up in d.upstream() {
            if let Some(&j) = by_name.get(up) {
                graph.add_edge(idx[j], idx[i], ());
            }
        }
    }
    match stable_toposort(&graph) {
        Some(order) => {
            let mut slots: Vec<Option<StageDecl>> = decls.into_iter().map(Some).collect();
            Ok(order.into_iter().filter_map(|i| slots[i].take()).collect())
        }
        None => {
            let mut errors = Vec::new();
            for scc in petgraph::algo::tarjan_scc(&graph) {
                if scc.len() < 2 {
                    continue;
                }
                let members: BTreeSet<usize> = scc.iter().map(|n| graph[*n]).collect();
                let path = cycle_path(&decls, &members);
                let first = &decls[*members.iter().next().unwrap_or(&0)];
                errors.push(
                    Diagnostic::at(sources, &first.span, format!("stages form a cycle: {path}"))
                        .with_help("a stage cannot depend on its own output; remove one `from` on the cycle"),
                );
            }
            Err(Diagnostics(errors))
        }
    }
}

/// A topological order of the graph's node weights (declaration indices) that keeps the
/// declaration order wherever the edges allow it (Kahn's algorithm, lowest index first), so
/// plans and reports list stages as the file does; `None` if there is a cycle.
pub(super) fn stable_toposort(graph: &DiGraph<usize, ()>) -> Option<Vec<usize>> {
    let mut indegree: Vec<usize> = graph
        .node_indices()
        .map(|n| {
            graph
                .neighbors_directed(n, petgraph::Direction::Incoming)
                .count()
        })
        .collect();
    let mut ready: BTreeSet<usize> = graph
        .node_indices()
        .filter(|n| indegree[n.index()] == 0)
        .map(|n| n.index())
        .collect();
    let mut order = Vec::with_capacity(indegree.len());
    while let Some(i) = ready.pop_first() {
        let n = NodeIndex::new(i);
        order.push(graph[n]);
        for r in graph.neighbors_directed(n, petgraph::Direction::Outgoing) {
            indegree[r.index()] -= 1;
            if indegree[r.index()] == 0 {
                ready.insert(r.index());
            }
        }
    }
    (order.len() == indegree.len()).then_some(order)
}

/// `a -> b -> c -> a` for a strongly connected set, following `from` edges.
pub(super) fn cycle_path(decls: &[StageDecl], members: &BTreeSet<usize>) -> String {
    let by_name: BTreeMap<&str, usize> = decls
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    let start = *members.iter().next().unwrap_or(&0);
    let mut path = vec![start];
    let mut cur = start;
    // Walk readers -> upstream inside the component until we return to the start.
    for _ in 0..members.len() {
        let next = decls[cur]
            .upstream()
            .filter_map(|u| by_name.get(u).copied())
            .find(|j| members.contains(j) && (*j == start || !path.contains(j)));
        match next {
            Some(j) => {
                path.push(j);
                if j == start {
                    break;
                }
                cur = j;
            }
            None => break,
        }
    }
    path.reverse();
    path.iter()
        .map(|&i| decls[i].name.as_str())
        .collect::<Vec<_>>()
        .join(" -> ")
}
