"""The page for people at ``/``: drop an image, see the top-k labels and the explanation overlay.

One self-contained HTML document (inline CSS and script, system fonts, no external
resource), so it works on a site's network without internet. It calls ``POST /predict``
like any client. When the service requires a token, the page asks for it once and keeps
it in the tab's session storage.
"""

from __future__ import annotations

import html

__all__ = ["page_html"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:820px;color:#222;line-height:1.45;padding:0 1rem}
h1{margin-bottom:.2rem} .muted{color:#666;font-size:.9rem}
#drop{border:2px dashed #99a;border-radius:8px;padding:2rem;text-align:center;background:#f8f9fb;cursor:pointer}
#drop.over{background:#eef2ff;border-color:#4456dd}
.controls{margin:.8rem 0;display:flex;gap:1rem;flex-wrap:wrap;align-items:center}
.result{display:flex;gap:1.2rem;align-items:flex-start;margin-top:1rem}
.result img{width:224px;height:224px;image-rendering:pixelated;border:1px solid #ccc;object-fit:contain;background:#000}
table{border-collapse:collapse} td{padding:.2rem .5rem} .bar{background:#4456dd;height:.8rem;border-radius:2px}
.error{color:#b00020;font-weight:600} .caveat{font-size:.85rem;color:#555;max-width:640px}
#token{display:none}
"""

_SCRIPT = r"""
(function () {
  var $ = function (id) { return document.getElementById(id); };
  var body = document.body;
  function setState(s) { body.dataset.state = s; }
  function show(el, on) { el.style.display = on ? '' : 'none'; }
  function token() { return sessionStorage.getItem('fedlens-token') || ''; }
  function esc(t) { var d = document.createElement('div'); d.textContent = t; return d.innerHTML; }
  function render(file, doc) {
    var out = $('results'); out.innerHTML = '';
    var p = doc.predictions[0];
    var rows = p.top.map(function (t) {
      var pct = (t.probability * 100).toFixed(1);
      return '<tr class="top"><td class="label">' + esc(t.label) + '</td><td>' + pct + ' %</td>' +
        '<td style="width:220px"><div class="bar" style="width:' + pct + '%"></div></td></tr>';
    }).join('');
    var left = document.createElement('div');
    var img = document.createElement('img'); img.alt = 'your image'; img.src = URL.createObjectURL(file);
    left.appendChild(img);
    var right = document.createElement('div');
    right.innerHTML = '<table id="topk">' + rows + '</table>' +
      '<p class="muted">model version ' + esc(doc.model.version) + ' (' + esc(doc.model.backend) + ')</p>';
    var box = document.createElement('div'); box.className = 'result';
    box.appendChild(left); box.appendChild(right); out.appendChild(box);
    if (p.explanation) {
      var e = p.explanation;
      var fig = document.createElement('div'); fig.className = 'result';
      fig.innerHTML = '<img id="overlay" alt="explanation overlay" src="' + e.overlay + '">' +
        '<div><b>' + esc(e.title) + '</b> for <b>' + esc(e['class']) + '</b>: ' + esc(e.summary) +
        '<p class="caveat">' + esc(e.caveat) + '</p></div>';
      out.appendChild(fig);
    }
  }
  function send(file) {
    var form = new FormData(); form.append('file', file, file.name || 'image');
    var q = '?top_k=' + $('k').value + ($('method').value ? '&explain=' + $('method').value : '');
    var headers = token() ? {'Authorization': 'Bearer ' + token()} : {};
    $('status').textContent = 'working…'; $('status').className = 'muted'; setState('busy');
    fetch('predict' + q, {method: 'POST', body: form, headers: headers}).then(function (r) {
      return r.json().then(function (doc) { return {status: r.status, doc: doc}; });
    }).then(function (res) {
      if (res.status === 401) { show($('token'), true); }
      if (res.status !== 200) {
        $('status').textContent = res.status + ': ' + (res.doc.error || JSON.stringify(res.doc));
        $('status').className = 'error'; setState('error'); return;
      }
      $('status').textContent = ''; render(file, res.doc); setState('done');
    }).catch(function (err) { $('status').textContent = String(err); $('status').className = 'error'; setState('error'); });
  }
  var drop = $('drop'), input = $('file');
  drop.addEventListener('click', function () { input.click(); });
  drop.addEventListener('dragover', function (e) { e.preventDefault(); drop.className = 'over'; });
  drop.addEventListener('dragleave', function () { drop.className = ''; });
  drop.addEventListener('drop', function (e) { e.preventDefault(); drop.className = ''; if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]); });
  input.addEventListener('change', function () { if (input.files.length) send(input.files[0]); });
  $('save-token').addEventListener('click', function () { sessionStorage.setItem('fedlens-token', $('token-value').value); show($('token'), false); });
  setState('ready');
})();
"""


def page_html(*, name: str, classes: list[str], methods: dict[str, str], private: str) -> str:
    """The page, for a model ``name`` with ``classes``; ``methods`` maps ``?explain=`` values to titles."""
    e = html.escape
    options = "".join(f'<option value="{e(v)}">{e(t)}</option>' for v, t in methods.items())
    k_options = "".join(
        f'<option value="{k}"{" selected" if k == min(3, len(classes)) else ""}>{k}</option>' for k in range(1, len(classes) + 1)
    )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>fedlens: {e(name)}</title><style>{_CSS}</style></head><body data-state='loading'>"
        f"<h1>Classify an image</h1><p class='muted'>model <b>{e(name)}</b> · {len(classes)} classes · {e(private)} · "
        "<a href='openapi.json'>API (OpenAPI)</a> · <a href='metrics'>metrics</a></p>"
        "<div id='drop'>Drop an image here, or click to choose one<input id='file' type='file' accept='image/*,.dcm' hidden></div>"
        f"<div class='controls'><label>top <select id='k'>{k_options}</select></label>"
        f"<label>explanation <select id='method'><option value=''>none</option>{options}</select></label>"
        "<span id='status' class='muted'></span></div>"
        "<div id='token'>This service needs a token: <input id='token-value' type='password'> <button id='save-token'>use</button></div>"
        f"<div id='results'></div><script>{_SCRIPT}</script></body></html>"
    )
