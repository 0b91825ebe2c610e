// nbflow's log view (anywidget ES module; see logview.py). The model's `lines` is [[seq, stream, text]],
// oldest first. Only lines with a seq beyond the last one shown are appended, lines that fell off the
// front are removed, and the scroll position is kept: following (at the bottom) stays at the bottom,
// a reader who scrolled up keeps reading the same lines.

const NEAR_BOTTOM_PX = 8;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// `text` with each case-insensitive occurrence of `query` in a <mark>, built as DOM nodes (no HTML parsing).
function fill(node, text, query) {
  node.textContent = "";
  if (!query) {
    node.textContent = text;
    return true;
  }
  const lower = text.toLowerCase();
  let at = lower.indexOf(query);
  if (at < 0) {
    node.textContent = text;
    return false;
  }
  let from = 0;
  while (at >= 0) {
    node.append(text.slice(from, at), el("mark", "nbflow-log-match", text.slice(at, at + query.length)));
    from = at + query.length;
    at = lower.indexOf(query, from);
  }
  node.append(text.slice(from));
  return true;
}

function render({ model, el: root }) {
  root.classList.add("nbflow-log-view");
  const bar = el("div", "nbflow-log-bar");
  const search = el("input", "nbflow-log-search");
  search.type = "search";
  search.placeholder = "search the log";
  search.setAttribute("aria-label", "search the log");
  const count = el("span", "nbflow-log-count");
  const follow = el("button", "nbflow-log-follow", "↓ newest");
  follow.type = "button";
  follow.title = "scroll to the newest line and keep following it";
  const download = el("button", "nbflow-log-download", "⤓ download");
  download.type = "button";
  download.title = "the run's whole log as a .txt file";
  bar.append(search, count, follow, download);
  const scroll = el("div", "nbflow-log-scroll");
  scroll.setAttribute("role", "log");
  scroll.tabIndex = 0;
  root.append(bar, scroll);

  let shown = []; // [{seq, node, text}], oldest first
  let following = true;
  let query = "";

  const atBottom = () => scroll.scrollHeight - scroll.scrollTop - scroll.clientHeight <= NEAR_BOTTOM_PX;
  const toBottom = () => { scroll.scrollTop = scroll.scrollHeight; };

  function showState() {
    root.classList.toggle("nbflow-following", following);
    follow.setAttribute("aria-pressed", String(following));
    follow.disabled = following;
    const matching = query ? shown.filter((line) => !line.node.hidden).length : shown.length;
    count.textContent = query ? `${matching} of ${shown.length} lines` : `${shown.length} lines`;
  }

  function place(line) {
    line.node.hidden = !fill(line.node, line.text, query);
  }

  function sync() {
    const lines = model.get("lines") || [];
    if (lines.length === 0 && shown.length) following = true; // another run
    const first = lines.length ? lines[0][0] : Infinity;
    let removed = 0;
    while (shown.length && shown[0].seq < first) {
      removed += shown[0].node.offsetHeight;
      shown.shift().node.remove();
    }
    const last = shown.length ? shown[shown.length - 1].seq : -1;
    const fragment = document.createDocumentFragment();
    for (const [seq, stream, text] of lines) {
      if (seq <= last) continue;
      const line = { seq, text, node: el("div", `nbflow-log-line nbflow-${stream}`) };
      place(line);
      shown.push(line);
      fragment.append(line.node);
    }
    scroll.append(fragment);
    if (following) toBottom();
    else if (removed) scroll.scrollTop = Math.max(0, scroll.scrollTop - removed);
    showState();
  }

  scroll.addEventListener("scroll", () => {
    const now = atBottom();
    if (now !== following) {
      following = now;
      showState();
    }
  });
  follow.addEventListener("click", () => {
    following = true;
    toBottom();
    showState();
  });
  search.addEventListener("input", () => {
    query = search.value.trim().toLowerCase();
    for (const line of shown) place(line);
    if (following) toBottom();
    showState();
  });
  download.addEventListener("click", () => {
    download.disabled = true;
    model.send({ type: "download" });
  });
  function onMessage(msg) {
    if (!msg || msg.type !== "download") return;
    download.disabled = false;
    const blob = new Blob([msg.text], { type: "text/plain;charset=utf-8" });
    const link = el("a");
    link.href = URL.createObjectURL(blob);
    link.download = msg.filename || "nbflow-log.txt";
    root.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
  }

  model.on("change:lines", sync);
  model.on("msg:custom", onMessage);
  sync();
  // Shown in a hidden tab or an output that was collapsed: the height was 0; follow once it has one.
  const resize = new ResizeObserver(() => { if (following) toBottom(); });
  resize.observe(scroll);
  return () => {
    resize.disconnect();
    model.off("change:lines", sync);
    model.off("msg:custom", onMessage);
  };
}

export default { render };
