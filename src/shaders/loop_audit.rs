//! Proves, from a kernel's WGSL text, that every loop in it ends, so that
//! the kernel can compile without wgpu's loop counters
//! ([`wgpu::ShaderRuntimeChecks::force_loop_bounding`], which wgpu allows
//! only where "the caller ensures no infinite loops"). naga bounds every
//! loop left after the templates' unrolling with a 64-bit counter, which
//! costs the forward 14 % of its static cycles and 16 registers a lane on
//! NVIDIA's compiler and keeps drivers from unrolling small loops
//! themselves (BENCHMARKS.md, 2026-12-05).
//!
//! The proof is by form. Every loop must be a `for` (no `loop`, no
//! `while`) of one of two shapes:
//! - counting up: `for (var i = ...; ... && i < BOUND && ...; i++)` (or
//!   `<=`, or `i += STEP` with STEP a constant from 1 to [`MAX_STEP`]),
//!   whose body writes neither `i` (except `i = max(i, ...)`, a jump
//!   forward) nor anything BOUND reads, and whose BOUND reads no
//!   module-scope variable and calls no function but `min`, `max`, `u32`,
//!   `i32`;
//! - halving: `for (var s = ...; s > 0u; s /= N)` with N >= 2, whose body
//!   does not write `s`.
//!
//! A counting loop could still wrap around past its bound; it cannot
//! here because every bound the kernels count to is below 2^31 - 2^16:
//! sequence lengths (and positions) are at most
//! [`crate::MAX_SEQUENCE_LEN`] = 2^29, windows at most two sequence
//! lengths, element counts within one storage binding (< 2^31 bytes), and
//! the rest constants of the specialization.
//!
//! A kernel that does not pass (a file replaced through
//! [`crate::Gpu::override_shader_file`] with a loop of another form) keeps
//! wgpu's loop counters whatever [`crate::SkippedChecks`] asks.

use std::collections::{HashMap, HashSet};

/// The largest constant step a counting loop may take (the margin below
/// 2^31 that the bounds keep).
pub const MAX_STEP: i64 = 1 << 16;

/// Why the WGSL `source` (a kernel as the crate generates it:
/// [`crate::Gpu::forward_wgsl`]) has a loop the crate cannot prove finite,
/// the first one with its line, or `None` when every loop ends: then the
/// kernel compiles without wgpu's loop counters
/// ([`crate::SkippedChecks::CRATE_DEFAULT`]). The proof is by form: no
/// `loop` or `while`; every `for` declares its counter and counts it up
/// (`i++`, or `i += STEP` with STEP a constant from 1 to 65536) to a bound
/// (`i < B` or `i <= B` among its `&&`-joined conditions) that reads no
/// variable the kernel may write at module scope and nothing its body
/// writes, calls no function but `min`, `max`, `u32`, `i32`, and the body
/// writes the counter only as `i = max(i, ...)`; or halves it (`s /= 2u`
/// while `s > 0u`) without writing it. Counters cannot wrap around past
/// their bounds because positions are at most
/// [`crate::MAX_SEQUENCE_LEN`] = 2^29 and element counts stay within one
/// binding.
pub fn unproven_loop(source: &str) -> Option<String> {
    let tokens = tokenize(&strip_comments(source));
    let module = ModuleFacts::of(&tokens);
    for (at, token) in tokens.iter().enumerate() {
        match token.text.as_str() {
            "loop" | "while" => {
                return Some(format!(
                    "line {}: a `{}` statement (only `for` loops are proven)",
                    token.line, token.text
                ));
            }
            "for" => {
                if let Err(reason) = check_for(&tokens, at, &module) {
                    return Some(format!("line {}: {reason}", token.line));
                }
            }
            _ => {}
        }
    }
    None
}

#[derive(Debug, Clone, PartialEq)]
struct Token {
    text: String,
    line: usize,
}

/// The source without `//` and `/* */` comments (newlines kept, for line
/// numbers).
fn strip_comments(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut chars = source.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('/', Some('/')) => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            ('/', Some('*')) => {
                chars.next();
                let mut last = ' ';
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                    }
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// Operators of more than one character, longest first.
const OPERATORS: [&str; 19] = [
    "<<=", ">>=", "++", "--", "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", "<=", ">=", "==",
    "!=", "&&", "||", "->",
];

/// Assignments, compound or not, and the increments.
const WRITES: [&str; 13] = [
    "=", "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", "<<=", ">>=", "++", "--",
];

fn tokenize(source: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    for (index, line) in source.lines().enumerate() {
        let bytes = line.as_bytes();
        let mut at = 0;
        while at < bytes.len() {
            let c = bytes[at] as char;
            let start = at;
            if c.is_whitespace() {
                at += 1;
                continue;
            }
            if c.is_ascii_alphanumeric() || c == '_' {
                // Identifiers, keywords and numbers (with their suffixes
                // and decimal points).
                while at < bytes.len() {
                    let c = bytes[at] as char;
                    if c.is_ascii_alphanumeric()
                        || c == '_'
                        || (c == '.' && is_number(&line[start..at]))
                    {
                        at += 1;
                    } else {
                        break;
                    }
                }
            } else {
                at += OPERATORS
                    .iter()
                    .find(|op| line[at..].starts_with(*op))
                    .map_or(c.len_utf8(), |op| op.len());
            }
            tokens.push(Token {
                text: line[start..at].to_string(),
                line: index + 1,
            });
        }
    }
    tokens
}

fn is_number(text: &str) -> bool {
    text.starts_with(|c: char| c.is_ascii_digit())
}

fn is_identifier(text: &str) -> bool {
    text.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
}

/// What the loops' checks need from the whole module: the values of
/// `const` and `let` names (as token runs), and the module-scope
/// variables the kernel may write.
struct ModuleFacts<'a> {
    definitions: HashMap<&'a str, Vec<&'a [Token]>>,
    module_vars: HashSet<&'a str>,
    /// Names of pointers (`ptr<...>` parameters, `let p = &x;`): what
    /// they point at may change under another name.
    pointers: HashSet<&'a str>,
    /// Names declared as variables or parameters anywhere: a step named
    /// like one of them may be it (a parameter shadowing a constant), so
    /// it is no constant.
    runtime_names: HashSet<&'a str>,
}

impl<'a> ModuleFacts<'a> {
    fn of(tokens: &'a [Token]) -> Self {
        let mut definitions: HashMap<&str, Vec<&[Token]>> = HashMap::new();
        let mut module_vars = HashSet::new();
        let mut pointers = HashSet::new();
        let mut runtime_names = HashSet::new();
        let mut depth = 0usize;
        for (at, token) in tokens.iter().enumerate() {
            if token.text == "ptr" && at >= 2 && tokens[at - 1].text == ":" {
                pointers.insert(tokens[at - 2].text.as_str());
            }
            // `(name:`, `, name:` or `@attribute(...) name:`: a parameter
            // (or a struct member, which only makes the proof stricter).
            let parameter = at >= 1
                && matches!(tokens[at - 1].text.as_str(), "(" | "," | ")")
                && tokens.get(at + 1).is_some_and(|t| t.text == ":");
            if parameter {
                runtime_names.insert(token.text.as_str());
            }
            let declared = (token.text == "var")
                .then(|| var_declaration(tokens, at))
                .flatten();
            if let Some((name, _)) = &declared {
                runtime_names.insert(*name);
            }
            match token.text.as_str() {
                "{" => depth += 1,
                "}" => depth = depth.saturating_sub(1),
                "const" | "let" => {
                    let Some(name) = tokens.get(at + 1) else {
                        continue;
                    };
                    let Some(eq) = tokens[at..].iter().position(|t| t.text == "=") else {
                        continue;
                    };
                    let Some(end) = tokens[at..].iter().position(|t| t.text == ";") else {
                        continue;
                    };
                    if eq < end && tokens.get(at + eq + 1).is_some_and(|t| t.text == "&") {
                        pointers.insert(name.text.as_str());
                    }
                    if eq < end {
                        definitions
                            .entry(name.text.as_str())
                            .or_default()
                            .push(&tokens[at + eq + 1..at + end]);
                    }
                }
                // `var<space> name` at module scope, where the kernel may
                // write it (uniforms and read-only storage it cannot).
                "var" if depth == 0 => {
                    if let Some((name, space)) = &declared {
                        let writable = !(space.contains(&"uniform")
                            || space.contains(&"storage") && !space.contains(&"read_write"));
                        if writable {
                            module_vars.insert(*name);
                        }
                    }
                }
                _ => {}
            }
        }
        ModuleFacts {
            definitions,
            module_vars,
            pointers,
            runtime_names,
        }
    }

    /// The value of a constant integer expression of literals, `const` and
    /// `let` names, `+`, `*`, parentheses and `u32()`/`i32()`; a name
    /// defined more than once must have one value.
    fn evaluate(&self, tokens: &[Token], depth: usize) -> Option<i64> {
        if depth > 16 {
            return None;
        }
        let mut parser = ConstParser {
            facts: self,
            tokens,
            at: 0,
            depth,
        };
        let value = parser.sum()?;
        (parser.at == tokens.len()).then_some(value)
    }

    fn value_of(&self, name: &str, depth: usize) -> Option<i64> {
        if self.runtime_names.contains(name) {
            return None;
        }
        let definitions = self.definitions.get(name)?;
        let mut values = definitions.iter().map(|d| self.evaluate(d, depth + 1));
        let first = values.next()??;
        values.all(|v| v == Some(first)).then_some(first)
    }
}

struct ConstParser<'f, 't> {
    facts: &'f ModuleFacts<'f>,
    tokens: &'t [Token],
    at: usize,
    depth: usize,
}

impl ConstParser<'_, '_> {
    fn peek(&self) -> Option<&str> {
        self.tokens.get(self.at).map(|t| t.text.as_str())
    }

    fn sum(&mut self) -> Option<i64> {
        self.chain("+", Self::product, i64::checked_add)
    }

    fn product(&mut self) -> Option<i64> {
        self.chain("*", Self::term, i64::checked_mul)
    }

    /// `operand (op operand)*`, combined left to right.
    fn chain(
        &mut self,
        op: &str,
        operand: fn(&mut Self) -> Option<i64>,
        combine: fn(i64, i64) -> Option<i64>,
    ) -> Option<i64> {
        let mut value = operand(self)?;
        while self.peek() == Some(op) {
            self.at += 1;
            value = combine(value, operand(self)?)?;
        }
        Some(value)
    }

    fn term(&mut self) -> Option<i64> {
        let text = self.peek()?.to_string();
        self.at += 1;
        if text == "(" || text == "u32" || text == "i32" {
            if text != "(" {
                (self.peek() == Some("(")).then_some(())?;
                self.at += 1;
            }
            let value = self.sum()?;
            (self.peek() == Some(")")).then_some(())?;
            self.at += 1;
            return Some(value);
        }
        if is_number(&text) {
            return text.trim_end_matches(['u', 'i']).parse().ok();
        }
        if is_identifier(&text) {
            return self.facts.value_of(&text, self.depth);
        }
        None
    }
}

/// The name a `var` at `tokens[at]` declares, and the words of its
/// address space (`var<storage, read> name`; empty for `var name`).
fn var_declaration(tokens: &[Token], at: usize) -> Option<(&str, Vec<&str>)> {
    let mut next = at + 1;
    let mut space = Vec::new();
    if tokens.get(next).is_some_and(|t| t.text == "<") {
        next += 1;
        while let Some(t) = tokens.get(next).filter(|t| t.text != ">") {
            space.push(t.text.as_str());
            next += 1;
        }
        next += 1;
    }
    tokens.get(next).map(|name| (name.text.as_str(), space))
}

/// The index of the token closing the bracket opened at `open`.
fn closing(tokens: &[Token], open: usize) -> Option<usize> {
    let (opener, closer) = match tokens[open].text.as_str() {
        "(" => ("(", ")"),
        "{" => ("{", "}"),
        "[" => ("[", "]"),
        _ => return None,
    };
    let mut depth = 0usize;
    for (at, token) in tokens.iter().enumerate().skip(open) {
        if token.text == opener {
            depth += 1;
        } else if token.text == closer {
            depth -= 1;
            if depth == 0 {
                return Some(at);
            }
        }
    }
    None
}

/// `tokens` split at the top-level (outside brackets) occurrences of
/// `separator`.
fn split_top_level<'t>(tokens: &'t [Token], separator: &str) -> Vec<&'t [Token]> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (at, token) in tokens.iter().enumerate() {
        match token.text.as_str() {
            "(" | "[" => depth += 1,
            ")" | "]" => depth -= 1,
            text if depth == 0 && text == separator => {
                parts.push(&tokens[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    parts.push(&tokens[start..]);
    parts
}

fn texts(tokens: &[Token]) -> Vec<&str> {
    tokens.iter().map(|t| t.text.as_str()).collect()
}

fn spelled(tokens: &[Token]) -> String {
    texts(tokens).join(" ")
}

/// How a loop's counter moves.
enum Update {
    Up,
    Halving,
}

/// Checks the `for` loop whose keyword is `tokens[at]`.
fn check_for(tokens: &[Token], at: usize, module: &ModuleFacts) -> Result<(), String> {
    let open = at + 1;
    if tokens.get(open).is_none_or(|t| t.text != "(") {
        return Err("a `for` without its header".to_string());
    }
    let close = closing(tokens, open).ok_or("an unclosed `for` header")?;
    let header = &tokens[open + 1..close];
    let [init, condition, update] = split_top_level(header, ";")[..] else {
        return Err(format!("`for ({})`: not three clauses", spelled(header)));
    };
    let counter = match texts(init)[..] {
        ["var", name, ..] if is_identifier(name) => name,
        _ => {
            return Err(format!(
                "`for ({})`: the counter is not declared by the loop",
                spelled(header)
            ));
        }
    };
    let update_kind = match texts(update)[..] {
        [name, "++"] if name == counter => Update::Up,
        [name, "+=", ..] if name == counter => {
            let step = module.evaluate(&update[2..], 0);
            match step {
                Some(step) if (1..=MAX_STEP).contains(&step) => Update::Up,
                _ => {
                    return Err(format!(
                        "`for ({})`: its step {} is not a constant from 1 to {MAX_STEP}",
                        spelled(header),
                        spelled(&update[2..])
                    ));
                }
            }
        }
        [name, "/=", divisor] if name == counter => match module.evaluate(&update[2..], 0) {
            Some(d) if d >= 2 && is_number(divisor) => Update::Halving,
            _ => {
                return Err(format!(
                    "`for ({})`: it divides by less than 2",
                    spelled(header)
                ));
            }
        },
        _ => {
            return Err(format!(
                "`for ({})`: its update is not `{counter}++`, `{counter} += STEP` or `{counter} /= N`",
                spelled(header)
            ));
        }
    };
    if split_top_level(condition, "||").len() > 1 {
        return Err(format!(
            "`for ({})`: a condition with `||`",
            spelled(header)
        ));
    }
    let conjuncts = split_top_level(condition, "&&");
    let body_open = close + 1;
    if tokens.get(body_open).is_none_or(|t| t.text != "{") {
        return Err(format!("`for ({})`: no body", spelled(header)));
    }
    let body_close = closing(tokens, body_open).ok_or("an unclosed loop body")?;
    let body = body_tokens(tokens, body_open + 1, body_close, counter);
    if let Some(line) = shadows(&body, counter) {
        return Err(format!(
            "`for ({})`: the body declares another `{counter}` (line {line})",
            spelled(header)
        ));
    }
    match update_kind {
        Update::Halving => {
            let ends = conjuncts
                .iter()
                .any(|c| matches!(texts(c)[..], [name, ">", "0u" | "0"] if name == counter));
            if !ends {
                return Err(format!(
                    "`for ({})`: a halving counter without `{counter} > 0`",
                    spelled(header)
                ));
            }
            if let Some(write) = writes_to(&body, counter, false) {
                return Err(format!(
                    "`for ({})`: the body writes its counter (line {write})",
                    spelled(header)
                ));
            }
        }
        Update::Up => {
            let bound = conjuncts
                .iter()
                .find_map(|c| match texts(c)[..] {
                    [name, "<" | "<=", ..] if name == counter => Some(&c[2..]),
                    _ => None,
                })
                .ok_or_else(|| {
                    format!(
                        "`for ({})`: no `{counter} < BOUND` or `{counter} <= BOUND` in the condition",
                        spelled(header)
                    )
                })?;
            if bound.iter().any(|t| t.text == counter) {
                return Err(format!(
                    "`for ({})`: its bound reads its counter",
                    spelled(header)
                ));
            }
            check_bound(bound, &body, module)
                .map_err(|reason| format!("`for ({})`: {reason}", spelled(header)))?;
            if let Some(write) = writes_to(&body, counter, true) {
                return Err(format!(
                    "`for ({})`: the body writes its counter (line {write}) other than by `{counter} = max({counter}, ...)`",
                    spelled(header)
                ));
            }
        }
    }
    Ok(())
}

/// The body's tokens without the nested `for` loops that declare a counter
/// of the same name (their writes are to theirs).
fn body_tokens<'t>(tokens: &'t [Token], start: usize, end: usize, counter: &str) -> Vec<&'t Token> {
    let mut kept = Vec::new();
    let mut at = start;
    while at < end {
        let nested_same = tokens[at].text == "for"
            && tokens.get(at + 3).is_some_and(|t| t.text == counter)
            && tokens.get(at + 2).is_some_and(|t| t.text == "var");
        if nested_same {
            let skip_to = closing(tokens, at + 1)
                .and_then(|close| closing(tokens, close + 1))
                .unwrap_or(end);
            at = skip_to + 1;
            continue;
        }
        kept.push(&tokens[at]);
        at += 1;
    }
    kept
}

/// The line of the first write in `body` to `name` (or to a member or
/// element of it), or of the first `&name`. With `allow_max`, writes of
/// the form `name = max(name, ...)` are allowed.
fn writes_to(body: &[&Token], name: &str, allow_max: bool) -> Option<usize> {
    for (at, token) in body.iter().enumerate() {
        if token.text != name || at > 0 && body[at - 1].text == "." {
            continue;
        }
        let before = at.checked_sub(1).map(|b| body[b].text.as_str());
        let address_of = before == Some("&")
            && at
                .checked_sub(2)
                .map(|b| body[b].text.as_str())
                .is_none_or(|t| !(is_identifier(t) || is_number(t) || t == ")" || t == "]"));
        if address_of {
            return Some(token.line);
        }
        // Past any `.member` and `[index]` to the operator that follows.
        let mut next = at + 1;
        loop {
            match body.get(next).map(|t| t.text.as_str()) {
                Some(".") => next += 2,
                Some("[") => {
                    let mut depth = 0;
                    while let Some(t) = body.get(next) {
                        match t.text.as_str() {
                            "[" => depth += 1,
                            "]" => {
                                depth -= 1;
                                if depth == 0 {
                                    break;
                                }
                            }
                            _ => {}
                        }
                        next += 1;
                    }
                    next += 1;
                }
                _ => break,
            }
        }
        let Some(op) = body.get(next).map(|t| t.text.as_str()) else {
            continue;
        };
        if !WRITES.contains(&op) {
            continue;
        }
        let forward_jump = allow_max
            && next == at + 1
            && op == "="
            && body.get(at + 2).is_some_and(|t| t.text == "max")
            && body.get(at + 3).is_some_and(|t| t.text == "(")
            && body.get(at + 4).is_some_and(|t| t.text == name)
            && body.get(at + 5).is_some_and(|t| t.text == ",");
        if !forward_jump {
            return Some(token.line);
        }
    }
    None
}

/// The line where `body` declares a variable or constant named `name`.
fn shadows(body: &[&Token], name: &str) -> Option<usize> {
    body.windows(2)
        .find(|w| matches!(w[0].text.as_str(), "var" | "let" | "const") && w[1].text == name)
        .map(|w| w[1].line)
}

/// A counting loop's bound: no module-scope variable the kernel may
/// write, no pointer, no call but the pure conversions and `min`/`max`,
/// nothing the body writes.
fn check_bound(bound: &[Token], body: &[&Token], module: &ModuleFacts) -> Result<(), String> {
    if bound.is_empty() {
        return Err("an empty bound".to_string());
    }
    for (at, token) in bound.iter().enumerate() {
        let name = token.text.as_str();
        if !is_identifier(name) || at > 0 && bound[at - 1].text == "." {
            continue;
        }
        if bound.get(at + 1).is_some_and(|t| t.text == "(") {
            if !matches!(name, "min" | "max" | "u32" | "i32") {
                return Err(format!("its bound calls `{name}`"));
            }
            continue;
        }
        if module.module_vars.contains(name) {
            return Err(format!(
                "its bound reads the module-scope variable `{name}`"
            ));
        }
        if module.pointers.contains(name) {
            return Err(format!("its bound reads through the pointer `{name}`"));
        }
        if let Some(line) = writes_to(body, name, false) {
            return Err(format!(
                "the body writes `{name}`, which its bound reads (line {line})"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(body: &str) -> String {
        format!(
            "const WG_SIZE: u32 = 64u;\nconst BLOCK_N: u32 = WG_SIZE * 2u;\n\
             var<workgroup> tile: array<f32, 64>;\n\
             var<uniform> p: Params;\n\
             var<storage, read> lens: array<u32>;\n\
             var<storage, read_write> out: array<u32>;\n\
             @compute @workgroup_size(64)\nfn main(@builtin(local_invocation_index) lid: u32, q: ptr<function, array<u32, 4>>) {{\n\
             let n = p.len;\n{body}\n}}\n"
        )
    }

    fn proven(body: &str) -> bool {
        unproven_loop(&kernel(body)).is_none()
    }

    #[test]
    fn counting_and_halving_loops_are_proven() {
        for body in [
            "for (var i = 0u; i < n; i++) { tile[i] = 0.0; }",
            "for (var i = lid; in_range && i < n * 4u; i += WG_SIZE) { }",
            "for (var k = 0; k <= hi; k += i32(BLOCK_N)) { let x = k; }",
            "var hi = 3;\nfor (var k = lo; k <= hi; k += 4) { k = max(k, page_end - 4); }",
            "for (var s = WG_SIZE / 2u; s > 0u; s /= 2u) { workgroupBarrier(); }",
            // An inner loop with its own `i` may count it.
            "for (var i = 0u; i < n; i++) { for (var i = 0u; i < 4u; i++) { } }",
            "for (var i = 0u; i < min(n, 8u); i++) { } // loop { }",
            "for (var i = 0u; i < p.len; i++) { }",
            "for (var i = 0u; i < lens[0]; i++) { }",
            "/* while (true) { } */ for (var i = 0u; i < n; i++) { }",
        ] {
            assert!(proven(body), "{body}: {:?}", unproven_loop(&kernel(body)));
        }
    }

    #[test]
    fn loops_that_may_not_end_are_refused() {
        for (body, why) in [
            ("loop { break; }", "a `loop` statement"),
            ("while (n > 0u) { }", "a `while` statement"),
            (
                "for (var i = 0u; i < n; i += 0u) { }",
                "not a constant from 1",
            ),
            (
                "for (var i = 0u; i < n; i += step) { }",
                "not a constant from 1",
            ),
            (
                "for (var i = 0u; i < n; i += 65537u) { }",
                "not a constant from 1",
            ),
            ("for (var i = 10u; i > 0u; i--) { }", "its update is not"),
            ("for (var i = 0u; i != n; i++) { }", "no `i < BOUND`"),
            (
                "for (var i = 0u; i < n || ok; i++) { }",
                "a condition with `||`",
            ),
            (
                "for (var i = 0u; i < n; i++) { i = 0u; }",
                "writes its counter",
            ),
            (
                "for (var i = 0u; i < n; i++) { i -= 1u; }",
                "writes its counter",
            ),
            (
                "for (var i = 0u; i < n; i++) { reset(&i); }",
                "writes its counter",
            ),
            (
                "var m = 4u;\nfor (var i = 0u; i < m; i++) { m += 1u; }",
                "writes `m`",
            ),
            (
                "var r: R;\nfor (var i = 0u; i < r.hi; i++) { r.hi = i + 2u; }",
                "writes `r`",
            ),
            (
                "for (var i = 0u; i < arrayLength(&b); i++) { }",
                "calls `arrayLength`",
            ),
            (
                "for (var i = 0u; i < tile[0]; i++) { }",
                "module-scope variable `tile`",
            ),
            (
                "for (var i = 0u; i < out[0]; i++) { }",
                "module-scope variable `out`",
            ),
            (
                "var m = 4u;\nlet pm = &m;\nfor (var i = 0u; i < *pm; i++) { m = 9u; }",
                "pointer `pm`",
            ),
            ("for (var i = 0u; i < (*q)[0]; i++) { }", "pointer `q`"),
            ("for (var i = 0u; i < n + i; i++) { }", "reads its counter"),
            ("for (var i = 0u; i < n; i += lid) { }", "not a constant"),
            (
                "for (var s = 8u; s > 0u; s /= 1u) { }",
                "divides by less than 2",
            ),
            ("for (var s = 8u; s >= 0u; s /= 2u) { }", "without `s > 0`"),
            (
                "for (var i = 0u; i < n; i++) { var i = 3u; }",
                "declares another `i`",
            ),
            (
                "var i = 0u;\nfor (; i < n; i++) { }",
                "not declared by the loop",
            ),
        ] {
            let reason = unproven_loop(&kernel(body)).unwrap_or_default();
            assert!(reason.contains(why), "{body}: {reason:?} lacks {why:?}");
        }
    }

    #[test]
    fn reasons_give_the_line() {
        let reason = unproven_loop(&kernel("\n\nloop { break; }")).unwrap();
        assert!(reason.starts_with("line 12:"), "{reason}");
    }

    #[test]
    fn constants_defined_twice_must_agree() {
        let agree = "const S = 4u;\nfn f() { const S = 4u; }\n\
                     fn main() { for (var i = 0u; i < n; i += S) { } }";
        assert_eq!(unproven_loop(agree), None);
        let differ = agree.replace("const S = 4u; }", "const S = 0u; }");
        assert!(unproven_loop(&differ).is_some());
        // A parameter named like a constant is no constant.
        let shadowed =
            "const S = 4u;\nfn f(n: u32, S: u32) { for (var i = 0u; i < n; i += S) { } }";
        let reason = unproven_loop(shadowed).unwrap_or_default();
        assert!(reason.contains("not a constant"), "{reason:?}");
    }
}
