"""``report.html``: the Markdown report as one self-contained page, every table sortable and filterable.

The page is made from ``results.md`` (:func:`harness.reporting.report.build_report`'s text) and the PNG figures
beside it, so it shows the same numbers, notes and provenance, never others: headings, paragraphs,
lists and GitHub tables are turned into HTML; the figures are inlined as base64; the style sheet and
the script are inline too (no external asset: it opens offline). Rows carry ``data-model``,
``data-budget`` and ``data-method`` (from their columns, or the section they are in) for the filters
at the top; a click on a column header sorts by it (numbers as numbers).

Opened with ``#selftest``, the page checks itself and writes the result as JSON into
``<pre id="selftest">``: the console errors and uncaught exceptions it saw, how many tables it has
and shows, whether sorting the first model table by top-1 ordered it, whether a filter hid rows.
``tests/test_html_report.py`` reads that with headless Chromium.
"""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

# the figures shown, in order, with what each shows
CAPTIONS = {
    "accuracy_vs_gmacs": "Top-1 against analytic GMACs, one panel per model; bars: 95 % Wilson intervals, series "
                         "dodged sideways so bars at one target stay apart; hollow: off the GMACs target.",
    "matched_budget": "Matched budgets: each method's top-1 [95 % Wilson]; dotted line and band: none's top-1 and "
                      "interval; *: differs from none after Holm adjustment (model x budget).",
    "controls": "Each method minus random pruning at its own schedule (random@method), with Newcombe's paired 95 % "
                "interval; *: significant after Holm adjustment over all control tests.",
    "speedup_vs_ideal": "Speed-up from rounds interleaved with the unpatched model in one process (median, "
                        "quartiles) against the ideal one (GMACs ratio); dashed: y = x.",
    "tokens_per_block": "Tokens after each block at one budget, one panel per method.",
}
FILTERS = (("model", "model"), ("budget", "budget"), ("method", "method"))
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#111}
h1,h2,h3{margin-top:1.4em} code{background:#f3f3f3;padding:0 .25em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:12.5px;display:block;overflow-x:auto}
th,td{border-bottom:1px solid #ddd;padding:2px 8px;text-align:right;white-space:nowrap}
th{cursor:pointer;background:#f7f7f7;position:sticky;top:0;user-select:none}
th.asc::after{content:" \\25B2"} th.desc::after{content:" \\25BC"}
td:nth-child(-n+3){text-align:left} tr:hover td{background:#fafae6}
#filters{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ccc;z-index:2}
#filters label{margin-right:1.2em} figure{margin:1em 0} img{max-width:100%}
figcaption{font-size:12.5px;color:#444}
"""
SCRIPT = r"""
(function(){
  var seen=[];
  window.addEventListener('error',function(e){seen.push('error: '+e.message);});
  var origError=console.error;
  console.error=function(){seen.push('console.error: '+Array.prototype.join.call(arguments,' '));
                           origError.apply(console,arguments);};
  function num(t){var s=t.replace(/\u2212/g,'-').replace(/[^0-9eE.+\-<]/g,' ').trim();
    if(s.charAt(0)=='<'){return parseFloat(s.slice(1))/2;}
    var v=parseFloat(s); return isNaN(v)?null:v;}
  function sortTable(table,col){
    var th=table.tHead.rows[0].cells[col], asc=!th.classList.contains('asc');
    Array.prototype.forEach.call(table.tHead.rows[0].cells,function(c){c.classList.remove('asc','desc');});
    th.classList.add(asc?'asc':'desc');
    var body=table.tBodies[0], rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=a.cells[col].textContent, y=b.cells[col].textContent, nx=num(x), ny=num(y), r;
      if(nx===null&&ny===null){r=x.localeCompare(y);} else if(nx===null){return 1;} else if(ny===null){return -1;}
      else {r=nx-ny;}
      return asc?r:-r;});
    rows.forEach(function(r){body.appendChild(r);});
  }
  function applyFilters(){
    var want={};
    document.querySelectorAll('#filters select').forEach(function(s){want[s.name]=s.value;});
    document.querySelectorAll('table tbody tr').forEach(function(tr){
      var show=true;
      Object.keys(want).forEach(function(k){
        var v=tr.getAttribute('data-'+k);
        if(want[k]&&v!==null&&v.split('|').indexOf(want[k])<0){show=false;}});
      tr.style.display=show?'':'none';});
  }
  function fillFilters(){
    document.querySelectorAll('#filters select').forEach(function(s){
      var vals={};
      document.querySelectorAll('tr[data-'+s.name+']').forEach(function(tr){
        tr.getAttribute('data-'+s.name).split('|').forEach(function(v){if(v){vals[v]=1;}});});
      Object.keys(vals).sort().forEach(function(v){var o=document.createElement('option');o.value=v;
        o.textContent=v;s.appendChild(o);});
      s.addEventListener('change',applyFilters);});
  }
  function selftest(){
    var out={errors:seen, tables:document.querySelectorAll('table').length, shown:0, sorted:null, filtered:null};
    document.querySelectorAll('table').forEach(function(t){if(t.offsetHeight>0){out.shown++;}});
    var t=document.querySelector('table.model'), col=-1;
    if(t){Array.prototype.forEach.call(t.tHead.rows[0].cells,function(c,i){
      if(col<0&&c.textContent.indexOf('top-1')===0){col=i;}});}
    if(t&&col>=0){
      t.tHead.rows[0].cells[col].click();
      var v=Array.prototype.map.call(t.tBodies[0].rows,function(r){return num(r.cells[col].textContent);});
      out.sorted=v.every(function(x,i){return i===0||x===null||v[i-1]===null||v[i-1]<=x;});
      t.id='sorted-table'; t.setAttribute('data-sorted-col',col);}
    var s=document.querySelector('#filters select[name=method]');
    if(s&&s.options.length>1){
      var total=document.querySelectorAll('table tbody tr').length;
      s.value=s.options[1].value; applyFilters();
      var hidden=Array.prototype.filter.call(document.querySelectorAll('table tbody tr'),
        function(tr){return tr.style.display==='none';}).length;
      out.filtered=hidden>0&&hidden<total; s.value=''; applyFilters();}
    var pre=document.getElementById('selftest'); pre.textContent=JSON.stringify(out); pre.hidden=false;
  }
  document.addEventListener('DOMContentLoaded',function(){
    document.querySelectorAll('table').forEach(function(t){
      Array.prototype.forEach.call(t.tHead.rows[0].cells,function(th,i){
        th.addEventListener('click',function(){sortTable(t,i);});});});
    fillFilters();
    if(location.hash==='#selftest'){selftest();}
  });
})();
"""


def _inline(text: str) -> str:
    """Markdown inline marks (``**bold**``, ```code```) as HTML, the rest escaped."""
    text = html.escape(text, quote=False)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _row_attrs(headers: list[str], cells: list[str], section: str) -> str:
    """``data-model/budget/method`` of a row: its own columns, else the section (a model's heading)."""
    cols = {h.lower(): c for h, c in zip(headers, cells)}
    attrs = {"model": cols.get("model", section), "budget": cols.get("budget"),
             "method": cols.get("method") or "|".join(v for v in (cols.get("a"), cols.get("b")) if v)}
    attrs["method"] = attrs["method"] and re.sub(r" \(baseline\)| \(\d+ records\)", "", attrs["method"])
    return "".join(f' data-{k}="{html.escape(v)}"' for k, v in attrs.items() if v)


def _table(lines: list[str], section: str, css: str) -> str:
    headers = _cells(lines[0])
    body = [_cells(line) for line in lines[2:]]
    out = [f'<table class="{css}"><thead><tr>' + "".join(f"<th>{_inline(h)}</th>" for h in headers) + "</tr></thead><tbody>"]
    for cells in body:
        out.append(f"<tr{_row_attrs(headers, cells, section)}>" + "".join(f"<td>{_inline(c)}</td>" for c in cells) + "</tr>")
    return "\n".join(out + ["</tbody></table>"])


def _blocks(markdown: str) -> list[list[str]]:
    """The Markdown's blocks: runs of lines between blank lines."""
    blocks, cur = [], []
    for line in markdown.splitlines():
        if line.strip():
            cur.append(line)
        elif cur:
            blocks.append(cur)
            cur = []
    return blocks + ([cur] if cur else [])


def _block_html(block: list[str], section: str, first_table: bool) -> str:
    if block[0].startswith("#"):
        level = len(block[0]) - len(block[0].lstrip("#"))
        return f"<h{level}>{_inline(block[0].lstrip('#').strip())}</h{level}>"
    if block[0].startswith("|"):
        return _table(block, section, "model" if first_table else "other")
    if block[0].startswith("- "):
        return "<ul>" + "".join(f"<li>{_inline(line[2:])}</li>" for line in block) + "</ul>"
    return "<p>" + _inline(" ".join(block)) + "</p>"


def body_html(markdown: str) -> str:
    """The report's Markdown as HTML; a model section's first table gets the class ``model``."""
    parts, section, first = [], "", True
    for block in _blocks(markdown):
        if block[0].startswith("## "):
            section, first = block[0][3:].strip(), True
        parts.append(_block_html(block, section, first and block[0].startswith("|") and section != ""))
        if block[0].startswith("|"):
            first = False
    return "\n".join(parts)


def figures_html(figures_dir: Path) -> str:
    """The double-column PNG figures inlined as base64, with their captions."""
    out = []
    for name, caption in CAPTIONS.items():
        path = Path(figures_dir) / f"{name}.png"
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode()
            out.append(f'<figure id="fig-{name}"><img alt="{name}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return "<h2>Figures</h2>\n" + "\n".join(out) if out else ""


def render(markdown: str, figures_dir: Path, title: str = "Results") -> str:
    """The whole page: filters, the figures, then the report's sections."""
    selects = "".join(f'<label>{label} <select name="{name}"><option value="">all</option></select></label>'
                      for name, label in FILTERS)
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>", f"<script>{SCRIPT}</script>", "</head><body>",
        f'<div id="filters">Filter: {selects} <small>(click a column header to sort)</small></div>',
        '<pre id="selftest" hidden></pre>', figures_html(figures_dir), body_html(markdown), "</body></html>", ""])


def write_html(markdown: str, reports_dir: Path) -> Path:
    """Write ``report.html`` beside ``results.md``; return its path."""
    path = Path(reports_dir) / "report.html"
    path.write_text(render(markdown, Path(reports_dir) / "figures"))
    return path
