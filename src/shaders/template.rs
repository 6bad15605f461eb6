//! The shader template preprocessor: `// #if NAME` / `// #else` /
//! `// #endif` variant blocks, and loops over named bounds expanded into
//! straight-line code.

use std::fmt::Write as _;

use super::VARIANT_NAMES;

/// A shader template mistake that the preprocessor refuses rather than
/// guesses around. `line` counts from 1 in the text the preprocessor was
/// given; `text` is the offending line (for a loop, its header), trimmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShaderSourceError {
    /// A flag asked for a variant no template may contain.
    #[error(
        "variant {name:?} was requested but is not a known variant name (known: {:?})",
        VARIANT_NAMES
    )]
    UnknownFlag { name: String },
    /// `// #if NAME` with a NAME outside [`VARIANT_NAMES`].
    #[error(
        "line {line}: `{text}` names no known variant (known: {:?})",
        VARIANT_NAMES
    )]
    UnknownVariant { line: usize, text: String },
    /// A `// #` line that is no directive, such as `// #ifdef X`.
    #[error(
        "line {line}: `{text}` is not a preprocessor directive (`// #if NAME`, `// #else`, \
         `// #endif`)"
    )]
    UnknownDirective { line: usize, text: String },
    /// `// #else` or `// #endif` outside any block.
    #[error("line {line}: `{text}` has no open `// #if` block")]
    NoOpenBlock { line: usize, text: String },
    /// A block's second `// #else`.
    #[error("line {line}: `{text}` is a second `// #else` in the block opened at line {opened}")]
    SecondElse {
        line: usize,
        text: String,
        opened: usize,
    },
    /// A block open at the end of the template (`line` is its `// #if`).
    #[error("line {line}: `{text}` is never closed by `// #endif`")]
    UnclosedBlock { line: usize, text: String },
    /// A loop over a bound the specialization unrolls, still there after
    /// unrolling because its header is not in the form the unroller expands.
    #[error(
        "line {line}: `{text}` loops to {bound}, which this specialization unrolls, but the \
         unroller only expands loops written `for (var x = 0u; x < {bound}; x++) {{`"
    )]
    LoopLeft {
        line: usize,
        text: String,
        bound: String,
    },
}

impl ShaderSourceError {
    /// The error with its line counted in `template`, the text the variant
    /// given to [`unroll_loops`] was selected from.
    pub(super) fn in_template(self, template: &str) -> Self {
        match self {
            ShaderSourceError::LoopLeft { text, bound, .. } => ShaderSourceError::LoopLeft {
                line: first_line_containing(template, &text),
                text,
                bound,
            },
            other => other,
        }
    }
}

/// A line of a template as the `// #if` preprocessor sees it.
enum TemplateLine<'a> {
    /// WGSL or an ordinary comment.
    Code,
    /// `// #if NAME`, with NAME.
    If(&'a str),
    Else,
    Endif,
    /// A `// #` line that is none of the above (say `// #ifdef X`).
    Unknown,
}

fn classify(line: &str) -> TemplateLine<'_> {
    let Some(directive) = line.trim().strip_prefix("// #") else {
        return TemplateLine::Code;
    };
    match directive {
        "else" => TemplateLine::Else,
        "endif" => TemplateLine::Endif,
        _ => directive
            .strip_prefix("if ")
            .map_or(TemplateLine::Unknown, |name| TemplateLine::If(name.trim())),
    }
}

/// A `// #if` block not yet closed by its `// #endif`.
struct OpenBlock<'a> {
    /// Where its `// #if` is.
    line: usize,
    text: &'a str,
    /// Whether the branch being read is kept.
    kept: bool,
    /// Whether its `// #else` has been read.
    in_else: bool,
}

/// Refuses requested variant names that no template can contain.
fn check_flags(flags: &[&str]) -> Result<(), ShaderSourceError> {
    match flags.iter().find(|flag| !VARIANT_NAMES.contains(flag)) {
        Some(flag) => Err(ShaderSourceError::UnknownFlag {
            name: flag.to_string(),
        }),
        None => Ok(()),
    }
}

/// Opens the block of `// #if name` at `line`, kept when `flags` names it.
fn open_block<'a>(
    line: usize,
    text: &'a str,
    name: &str,
    flags: &[&str],
) -> Result<OpenBlock<'a>, ShaderSourceError> {
    if !VARIANT_NAMES.contains(&name) {
        return Err(ShaderSourceError::UnknownVariant {
            line,
            text: text.to_string(),
        });
    }
    Ok(OpenBlock {
        line,
        text,
        kept: flags.contains(&name),
        in_else: false,
    })
}

/// Moves the innermost open block to its `// #else` branch.
fn enter_else(
    block: Option<&mut OpenBlock<'_>>,
    line: usize,
    text: &str,
) -> Result<(), ShaderSourceError> {
    let Some(block) = block else {
        return Err(ShaderSourceError::NoOpenBlock {
            line,
            text: text.to_string(),
        });
    };
    if block.in_else {
        return Err(ShaderSourceError::SecondElse {
            line,
            text: text.to_string(),
            opened: block.line,
        });
    }
    block.in_else = true;
    block.kept = !block.kept;
    Ok(())
}

/// Keeps the lines of `// #if NAME` blocks whose NAME is in `flags` and of
/// the `// #else` blocks of the others; drops the directive lines. Blocks
/// nest. Every NAME, in the source and in `flags`, must be one of
/// [`VARIANT_NAMES`], and every block must be well formed: an unknown name
/// or a stray directive is an error, never a silent `// #else`.
pub fn select_variants(source: &str, flags: &[&str]) -> Result<String, ShaderSourceError> {
    check_flags(flags)?;
    let mut open: Vec<OpenBlock> = Vec::new();
    let mut out = String::with_capacity(source.len());
    for (index, line) in source.lines().enumerate() {
        let (number, text) = (index + 1, line.trim());
        match classify(line) {
            TemplateLine::Code => {
                if open.iter().all(|block| block.kept) {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            TemplateLine::If(name) => open.push(open_block(number, text, name, flags)?),
            TemplateLine::Else => enter_else(open.last_mut(), number, text)?,
            TemplateLine::Endif => {
                if open.pop().is_none() {
                    return Err(ShaderSourceError::NoOpenBlock {
                        line: number,
                        text: text.to_string(),
                    });
                }
            }
            TemplateLine::Unknown => {
                return Err(ShaderSourceError::UnknownDirective {
                    line: number,
                    text: text.to_string(),
                });
            }
        }
    }
    match open.pop() {
        Some(block) => Err(ShaderSourceError::UnclosedBlock {
            line: block.line,
            text: block.text.to_string(),
        }),
        None => Ok(out),
    }
}

/// Expands every loop written exactly `for (var x = 0u; x < BOUND; x++) {`
/// whose BOUND is one of `bounds` into copies of its body, each wrapped as
/// `{ const x = Nu; body }` (a constant, so indices built from it are
/// const-expressions, as `subgroupBroadcast` requires). Nested loops are
/// expanded as well. Other loops are left alone, except that a loop still
/// comparing against one of `bounds` afterwards is an error: the
/// specialization counts on it being gone (no loop trips, constant lanes).
pub fn unroll_loops(source: &str, bounds: &[(&str, u32)]) -> Result<String, ShaderSourceError> {
    let out = expand_loops(source, bounds);
    match first_loop_left(&out, bounds) {
        None => Ok(out),
        Some((header, bound)) => Err(ShaderSourceError::LoopLeft {
            line: first_line_containing(source, header),
            text: header.to_string(),
            bound: bound.to_string(),
        }),
    }
}

/// The expansion of [`unroll_loops`], without its check.
fn expand_loops(source: &str, bounds: &[(&str, u32)]) -> String {
    let mut out = String::with_capacity(source.len() * 2);
    let mut rest = source;
    while let Some(found) = next_unrollable_loop(rest, bounds) {
        out.push_str(&rest[..found.start]);
        let body = expand_loops(&rest[found.body_start..found.body_end], bounds);
        for i in 0..found.count {
            let _ = writeln!(out, "{{ const {} = {i}u;{body}}}", found.var);
        }
        rest = &rest[found.body_end + 1..];
    }
    out.push_str(rest);
    out
}

/// The first `for` header in `source` (outside comments) whose condition
/// compares against one of `bounds`, and that bound.
fn first_loop_left<'s, 'b>(
    source: &'s str,
    bounds: &[(&'b str, u32)],
) -> Option<(&'s str, &'b str)> {
    source.lines().find_map(|line| {
        let code = line.split("//").next().unwrap_or_default();
        for_headers(code).find_map(|header| {
            let condition = header.split(';').nth(1)?;
            compared_bound(condition, bounds).map(|bound| (header, bound))
        })
    })
}

/// The `for (...)` headers in one line of code, each up to its body's `{`
/// (or the end of the line).
fn for_headers(code: &str) -> impl Iterator<Item = &str> {
    code.match_indices("for").filter_map(move |(at, _)| {
        let starts_word = !code[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
        let opens = code[at + "for".len()..].trim_start().starts_with('(');
        let header = code[at..].split('{').next().unwrap_or_default();
        (starts_word && opens).then(|| header.trim_end())
    })
}

/// The name among `bounds` that one side of `condition` is, whatever the
/// comparison and spacing (`d < D4`, `d<=D4`, `D4 > d`); `None` when the
/// bound only takes part in an expression (`i < BLOCK_N * D4`).
fn compared_bound<'b>(condition: &str, bounds: &[(&'b str, u32)]) -> Option<&'b str> {
    condition
        .split(['<', '>', '=', '!'])
        .map(|side| side.trim_matches(|c: char| c.is_whitespace() || c == '(' || c == ')'))
        .find_map(|side| {
            bounds
                .iter()
                .map(|&(name, _)| name)
                .find(|&name| name == side)
        })
}

/// 1-based number of the first line of `source` containing `text`; 0 when
/// none does.
fn first_line_containing(source: &str, text: &str) -> usize {
    source
        .lines()
        .position(|line| line.contains(text))
        .map_or(0, |index| index + 1)
}

struct UnrollableLoop<'a> {
    /// Byte offset of `for`.
    start: usize,
    var: &'a str,
    count: u32,
    /// Body between the braces (exclusive).
    body_start: usize,
    body_end: usize,
}

fn next_unrollable_loop<'a>(source: &'a str, bounds: &[(&str, u32)]) -> Option<UnrollableLoop<'a>> {
    let mut search_from = 0;
    while let Some(offset) = source[search_from..].find("for (var ") {
        let start = search_from + offset;
        search_from = start + 1;
        let header_rest = &source[start + "for (var ".len()..];
        let var_len = header_rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(0);
        let var = &header_rest[..var_len];
        let Some(after_var) = header_rest[var_len..].strip_prefix(" = 0u; ") else {
            continue;
        };
        let Some(after_cond_var) = after_var
            .strip_prefix(var)
            .and_then(|s| s.strip_prefix(" < "))
        else {
            continue;
        };
        let Some(&(_, count)) = bounds
            .iter()
            .find(|(name, _)| after_cond_var.starts_with(&format!("{name}; {var}++) {{")))
        else {
            continue;
        };
        let bound_len = after_cond_var.find(';').unwrap_or(0);
        let header_len = after_cond_var[bound_len..].find('{').unwrap_or(0) + 1;
        let body_start = source.len() - after_cond_var.len() + bound_len + header_len;
        let body_end = matching_brace(source, body_start)?;
        return Some(UnrollableLoop {
            start,
            var,
            count,
            body_start,
            body_end,
        });
    }
    None
}

/// Offset of the `}` that closes a block whose body starts at `body_start`.
fn matching_brace(source: &str, body_start: usize) -> Option<usize> {
    let mut depth = 1usize;
    for (offset, c) in source[body_start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(body_start + offset);
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{ShaderSourceError, select_variants, unroll_loops};

    const NESTED: &str = "a\n// #if SUBGROUP_KV\nx\n// #if MASK\nxy\n// #else\nx_not_y\n// #endif\n// #else\nnot_x\n// #endif\nb\n";

    #[test]
    fn keeps_the_selected_variant_and_nests() {
        let select = |flags: &[&str]| select_variants(NESTED, flags).unwrap();
        assert_eq!(select(&["SUBGROUP_KV"]), "a\nx\nx_not_y\nb\n");
        assert_eq!(select(&["SUBGROUP_KV", "MASK"]), "a\nx\nxy\nb\n");
        assert_eq!(select(&[]), "a\nnot_x\nb\n");
    }

    /// The error `select_variants` gives for `source` with no flags.
    fn variant_error(source: &str) -> ShaderSourceError {
        select_variants(source, &[]).expect_err("the preprocessor accepted a malformed template")
    }

    #[test]
    fn refuses_an_unknown_variant_name() {
        assert_eq!(
            variant_error("a\n// #if SUBGROUPKV\nx\n// #endif\n"),
            ShaderSourceError::UnknownVariant {
                line: 2,
                text: "// #if SUBGROUPKV".into()
            }
        );
    }

    #[test]
    fn refuses_an_unknown_requested_flag() {
        assert_eq!(
            select_variants(NESTED, &["MASK", "HALF"]),
            Err(ShaderSourceError::UnknownFlag {
                name: "HALF".into()
            })
        );
    }

    #[test]
    fn refuses_an_unknown_directive() {
        assert_eq!(
            variant_error("// #ifdef MASK\nx\n// #endif\n"),
            ShaderSourceError::UnknownDirective {
                line: 1,
                text: "// #ifdef MASK".into()
            }
        );
    }

    #[test]
    fn refuses_else_and_endif_without_a_block() {
        assert_eq!(
            variant_error("a\n  // #else\n"),
            ShaderSourceError::NoOpenBlock {
                line: 2,
                text: "// #else".into()
            }
        );
        assert_eq!(
            variant_error("// #if MASK\n// #endif\n// #endif\n"),
            ShaderSourceError::NoOpenBlock {
                line: 3,
                text: "// #endif".into()
            }
        );
    }

    #[test]
    fn refuses_a_second_else() {
        assert_eq!(
            variant_error("// #if MASK\na\n// #else\nb\n// #else\nc\n// #endif\n"),
            ShaderSourceError::SecondElse {
                line: 5,
                text: "// #else".into(),
                opened: 1
            }
        );
    }

    #[test]
    fn refuses_a_block_left_open() {
        assert_eq!(
            variant_error("// #if MASK\n// #if BF16_STORAGE\n// #endif\na\n"),
            ShaderSourceError::UnclosedBlock {
                line: 1,
                text: "// #if MASK".into()
            }
        );
    }

    #[test]
    fn unrolls_named_bounds_only_and_nests() {
        let source = "a; for (var d = 0u; d < D4; d++) { x[d] = 1; for (var r = 0u; r < ROWS; r++) { y[r] = d; } } for (var i = 0u; i < N; i++) { z; } for (var i = lid; i < BLOCK_N * D4; i += WG) { w; } b;";
        let out = unroll_loops(source, &[("D4", 2), ("ROWS", 3)]).unwrap();
        assert_eq!(out.matches("const d = ").count(), 2);
        assert_eq!(out.matches("const r = ").count(), 6);
        assert!(out.contains("for (var i = 0u; i < N; i++) { z; }"));
        assert!(out.contains("for (var i = lid; i < BLOCK_N * D4; i += WG) { w; }"));
        assert!(out.starts_with("a; ") && out.ends_with(" b;"));
        assert!(!out.contains("d < D4") && !out.contains("r < ROWS"));
    }

    /// The error `unroll_loops` gives for `source` when D4 and ROWS are
    /// unrolled.
    fn unroll_error(source: &str) -> ShaderSourceError {
        unroll_loops(source, &[("D4", 2), ("ROWS", 3)])
            .expect_err("a loop over an unrolled bound was left")
    }

    #[test]
    fn refuses_to_leave_a_loop_over_an_unrolled_bound() {
        assert_eq!(
            unroll_error("a;\n  for (var d: u32 = 0u; d < D4; d++) {\n x; }\n"),
            ShaderSourceError::LoopLeft {
                line: 2,
                text: "for (var d: u32 = 0u; d < D4; d++)".into(),
                bound: "D4".into()
            }
        );
        // Other spacing and comparisons, nested inside an unrolled loop.
        for header in [
            "for (var r = 0u; r<ROWS; r++)",
            "for(var r = 0u; r <= ROWS; r++)",
            "for (var r = 0u; ROWS > r; r++)",
            "for (var r = 0u;  r  <  ROWS ; r += 1u)",
        ] {
            let source = format!("for (var d = 0u; d < D4; d++) {{\n{header} {{ y; }}\n}}\n");
            match unroll_error(&source) {
                ShaderSourceError::LoopLeft { line, text, bound } => {
                    assert_eq!((line, text.as_str(), bound.as_str()), (2, header, "ROWS"));
                }
                other => panic!("{header}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_left_loop_is_located_in_the_template() {
        let left = ShaderSourceError::LoopLeft {
            line: 1,
            text: "for (var d: u32 = 0u; d < D4; d++)".into(),
            bound: "D4".into(),
        };
        let template = "// #if MASK\nm;\n// #endif\n  for (var d: u32 = 0u; d < D4; d++) {\n}\n";
        match left.in_template(template) {
            ShaderSourceError::LoopLeft { line, .. } => assert_eq!(line, 4),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn loops_in_comments_and_other_bounds_are_not_left_loops() {
        let source = "// for (var d: u32 = 0u; d < D4; d++) {\nfor (var i = 0u; i < D4X; i++) { a; }\nfor (var i = 0u; i < 2u * ROWS; i++) { b; }\n";
        assert_eq!(
            unroll_loops(source, &[("D4", 2), ("ROWS", 3)]).unwrap(),
            source
        );
    }
}
