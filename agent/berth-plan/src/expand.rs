//! Kubernetes' `$(VAR)` expansion in `command`, `args` and env values.
//!
//! `$(NAME)` becomes the variable's value when it is defined and stays as
//! written when it is not; `$$` is a literal `$`. No shell is involved.

pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut i = 0;
    let mut literal_start = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' && i + 1 < bytes.len() {
            out.push_str(&input[literal_start..i]);
            match bytes[i + 1] {
                b'$' => {
                    out.push('$');
                    i += 2;
                }
                b'(' => match input[i + 2..].find(')') {
                    Some(close) => {
                        let name = &input[i + 2..i + 2 + close];
                        match lookup(name) {
                            Some(value) => out.push_str(&value),
                            None => out.push_str(&input[i..i + 3 + close]),
                        }
                        i += 3 + close;
                    }
                    None => {
                        out.push_str("$(");
                        i += 2;
                    }
                },
                _ => {
                    out.push('$');
                    i += 1;
                }
            }
            literal_start = i;
        } else {
            i += 1;
        }
    }
    out.push_str(&input[literal_start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_kubernetes_rules() {
        let vars = |name: &str| match name {
            "HOST" => Some("db".to_string()),
            "PORT" => Some("5432".to_string()),
            _ => None,
        };
        let cases = [
            ("$(HOST):$(PORT)", "db:5432"),
            ("$$(HOST)", "$(HOST)"),
            ("$(MISSING)", "$(MISSING)"),
            ("cost $5", "cost $5"),
            ("$(HOST", "$(HOST"),
            ("tail $", "tail $"),
            ("plain", "plain"),
            ("$$$(PORT)", "$5432"),
            ("é$(HOST)é", "édbé"),
        ];
        for (input, want) in cases {
            assert_eq!(expand(input, vars), want, "{input}");
        }
    }
}
