"""Writes a fresh Cargo project from the README: the first ```toml block as its
dependencies (the adaround path pointed at this clone) and the first ```rust block as its
main function. Usage: readme_snippet.py README.md OUT_DIR CLONE_DIR"""
import re, sys, pathlib

readme, out, clone = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
text = pathlib.Path(readme).read_text()
toml = re.search(r"```toml\n(.*?)```", text, re.S).group(1)
rust = re.search(r"```rust\n(.*?)```", text, re.S).group(1)
toml = re.sub(r'path = "[^"]*crates/adaround"', f'path = "{clone}/crates/adaround"', toml)
code = "\n".join(line[2:] if line.startswith("# ") else line for line in rust.splitlines())
body = "\n".join("    " + line if line else "" for line in code.splitlines())
(out / "src").mkdir(parents=True, exist_ok=True)
(out / "Cargo.toml").write_text(
    '[package]\nname = "readme-snippet"\nversion = "0.0.0"\nedition = "2021"\n\n'
    "[workspace]\n\n" + toml
)
(out / "src" / "main.rs").write_text("fn main() {\n" + body + "\n}\n")
