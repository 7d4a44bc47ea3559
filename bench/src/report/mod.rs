//! `pclive-bench-report`: turns benchmark result lines into `results.md` and PNG plots.

pub mod markdown;
pub mod plots;
pub mod results;
pub mod targets;

use std::path::Path;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ReportError {
    #[error("cannot read {path}: {source}")]
    Input {
        path: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}: not a result line ({reason}); each line must be one JSON object with at least mode, link, records and read_ratio")]
    BadLine {
        file: String,
        line: usize,
        reason: String,
    },
    #[error("{0} holds no result lines: nothing to report")]
    Empty(String),
    #[error("cannot write {path}: {source}")]
    Output {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot load the font {path} ({reason}): install it with `apt-get install {package}`")]
    Font {
        path: &'static str,
        package: &'static str,
        reason: String,
    },
    #[error("cannot draw {path}: {reason}")]
    Plot { path: String, reason: String },
}

/// What a report run produced.
#[derive(Debug)]
pub struct Generated {
    pub groups: usize,
    pub runs: usize,
    pub files: Vec<String>,
    pub checks: Vec<targets::Check>,
}

/// Reads `input` and writes `results.md` and the plots into `out_dir` (created if needed).
pub fn generate(input: &Path, out_dir: &Path) -> Result<Generated, ReportError> {
    let text = std::fs::read_to_string(input).map_err(|source| ReportError::Input {
        path: input.display().to_string(),
        source,
    })?;
    let runs = results::parse_results(&text, &input.display().to_string())?;
    if runs.is_empty() {
        return Err(ReportError::Empty(input.display().to_string()));
    }
    let output_error = |path: &Path| {
        let path = path.display().to_string();
        move |source| ReportError::Output { path, source }
    };
    std::fs::create_dir_all(out_dir).map_err(output_error(out_dir))?;
    let groups = results::group(&runs);
    let checks = targets::all_checks(&groups);
    let results_dir = input.parent().unwrap_or(Path::new("."));
    let mut files = plots::write_all(&groups, results_dir, out_dir)?;
    let markdown = markdown::render(&groups, &checks, &files);
    let md_path = out_dir.join("results.md");
    std::fs::write(&md_path, markdown).map_err(output_error(&md_path))?;
    files.insert(0, "results.md".into());
    Ok(Generated {
        groups: groups.len(),
        runs: runs.len(),
        files,
        checks,
    })
}
