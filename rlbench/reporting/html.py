"""report.md → a self-contained report.html: tables as HTML, plots embedded as data URIs.

Not covered: Markdown beyond what rlbench/reporting/report.py writes (headings, paragraphs, pipe tables,
fenced code, images on a line of their own).
"""
from __future__ import annotations

import base64
import html
from pathlib import Path


def page(md: str, out: Path) -> str:
    """A self-contained page: tables as HTML, images embedded as data URIs."""
    body, in_code, table = [], False, []

    def flush_table():
        if not table:
            return
        rows = [[c.strip() for c in r.strip().strip("|").split("|")] for r in table if not set(r) <= set("|:- ")]
        body.append("<div class='scroll'><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) + "</tr>" +
                    "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:]) +
                    "</table></div>")
        table.clear()

    for line in md.splitlines():
        if line.startswith("```"):
            flush_table()
            body.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
        elif in_code:
            body.append(html.escape(line))
        elif line.startswith("|"):
            table.append(line)
        else:
            flush_table()
            if line.startswith("!["):
                src = line[line.index("(") + 1:-1]
                data = base64.b64encode((out / src).read_bytes()).decode()
                body.append(f'<p><img alt="{html.escape(src)}" src="data:image/png;base64,{data}"></p>')
            elif line.startswith("## "):
                body.append(f"<h2>{html.escape(line[3:])}</h2>")
            elif line.startswith("# "):
                body.append(f"<h1>{html.escape(line[2:])}</h1>")
            elif line.strip():
                body.append(f"<p>{html.escape(line)}</p>")
    flush_table()
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:12px;"
             "margin:1em 0}.scroll{overflow-x:auto}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}")
    # marks the page once every plot has decoded (read by the headless-browser test)
    script = ("<script>window.addEventListener('load',function(){var i=[].slice.call(document.images);"
              "document.body.setAttribute('data-images-loaded',i.length+':'+i.every(function(x){"
              "return x.complete&&x.naturalWidth>0}));});</script>")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>rlbench report</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}{script}</body></html>"
