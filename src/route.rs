//! `probex route MODEL.safetensors... --router RUN_OR_ARTIFACT`: which model tree each file
//! belongs to, with the router a `route` stage fitted, or none.

use std::path::PathBuf;

use clap::Args;
use probex_stages::route::Router;

/// Arguments of `probex route`.
#[derive(Args, Debug)]
pub struct RouteArgs {
    /// .safetensors model files
    #[arg(required = true)]
    models: Vec<PathBuf>,
    /// A run directory (its `route` node) or a `route` artifact directory
    #[arg(long)]
    router: PathBuf,
    /// The stage (or node) of the run whose router to use, when it has several
    #[arg(long)]
    stage: Option<String>,
    /// Print one JSON object per model
    #[arg(long)]
    json: bool,
}

/// Prints each model's tree; returns the exit code (2 when a file cannot be placed).
pub fn run(args: &RouteArgs) -> i32 {
    let router = match Router::locate(&args.router, args.stage.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            probex_engine::errln!("error: {e:#}");
            return 2;
        }
    };
    let trees = &router.routing.trees;
    let mut code = 0;
    for model in &args.models {
        let v = match router.place(model) {
            Ok(v) => v,
            Err(e) => {
                probex_engine::errln!("error: {e:#}");
                code = 2;
                continue;
            }
        };
        let p = v.placement;
        if args.json {
            let j = serde_json::json!({
                "model": model,
                "router": router.name,
                "tree": p.tree,
                "truth": p.tree.and_then(|k| trees[k].truth.clone()),
                "nearest": p.nearest,
                "distance": p.distance,
                "threshold": p.nearest.map(|k| trees[k].threshold),
            });
            probex_engine::outln!("{j}");
            continue;
        }
        let name = |k: usize| match &trees[k].truth {
            Some(t) => format!("tree {k} (mostly `{t}`)"),
            None => format!("tree {k}"),
        };
        let line = match (p.tree, p.nearest, p.distance) {
            (Some(k), _, Some(d)) => format!(
                "{}, distance {d:.4} <= threshold {:.4}",
                name(k),
                trees[k].threshold
            ),
            (None, Some(k), Some(d)) => format!(
                "no known tree: the nearest, {}, is at {d:.4} > threshold {:.4}",
                name(k),
                trees[k].threshold
            ),
            _ => "no known tree: no tree of the router has this architecture".to_string(),
        };
        probex_engine::outln!("{}: {line}", model.display());
    }
    code
}
