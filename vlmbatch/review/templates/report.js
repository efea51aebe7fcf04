"use strict";
// Renders one page of cards at a time from the JSON blob; data only ever reaches the DOM as
// textContent, as numbers in SVG attributes, or as an image the report wrote itself (a data: URI or
// report_files/), set with setAttribute: no markup is ever parsed from the data.
(function () {
  const meta = JSON.parse(document.getElementById("meta").textContent);
  const cards = JSON.parse(document.getElementById("data").textContent);
  // A row is [lang, question, text, mean_logprob, min_logprob, flags, error, siglip].
  const LANG = 0, QUESTION = 1, TEXT = 2, MEAN = 3, MIN = 4, FLAGS = 5, ERROR = 6, SIGLIP = 7;
  const state = { flag: "", lang: "", sort: "worst", query: "", page: 0 };
  const container = document.getElementById("cards");
  const info = document.getElementById("pageinfo");
  const prev = document.getElementById("prev");
  const next = document.getElementById("next");

  function lowest(card, column) {
    let best = Infinity;
    for (const row of card.r) if (row[column] !== null && row[column] < best) best = row[column];
    return best;
  }
  function longest(card) {
    let most = 0;
    for (const row of card.r) if (row[TEXT] !== null && row[TEXT].length > most) most = row[TEXT].length;
    return most;
  }
  const orders = {
    worst: null,
    confidence: (a, b) => lowest(a, MEAN) - lowest(b, MEAN) || a.n - b.n,
    length: (a, b) => longest(b) - longest(a) || a.n - b.n,
    siglip: (a, b) => lowest(a, SIGLIP) - lowest(b, SIGLIP) || a.n - b.n,
  };
  function shownRows(card) {
    return card.r.filter((row) => (!state.lang || row[LANG] === state.lang)
      && (!state.flag || row[FLAGS].includes(state.flag)));
  }
  function matches(card) {
    if (shownRows(card).length === 0) return false;
    if (!state.query) return true;
    if (card.id.toLowerCase().includes(state.query)) return true;
    return card.r.some((row) => row[TEXT] !== null && row[TEXT].toLowerCase().includes(state.query));
  }
  let view = cards;
  function refilter() {
    view = cards.filter(matches);
    const order = orders[state.sort];
    if (order) view = view.slice().sort(order);
    state.page = 0;
    render();
  }
  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }
  // The SVG namespace as the HTML parser gave it to the template's <svg>: the page spells out no URL.
  const SVG = document.getElementById("svg-namespace").content.firstElementChild.namespaceURI;
  const COLOURS = 6;  // .c0 ... .c5 in the stylesheet
  function svgNode(tag, attributes, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }
  // The thumbnail drawn inside an SVG whose user space is the original image's pixels, so boxes and
  // masks given as fractions land on the picture wherever "meet" letterboxes it.
  function overlayNode(card) {
    const [w, h] = card.s;
    const root = svgNode("svg", { class: "thumb overlay", viewBox: "0 0 " + w + " " + h, role: "img",
      "aria-label": card.o.length + " objects" });
    if (card.t) {
      root.appendChild(svgNode("image", { class: "picture", href: card.t, x: 0, y: 0, width: w, height: h,
        preserveAspectRatio: "none" }));
    } else {
      root.appendChild(svgNode("rect", { class: "blank", x: 0, y: 0, width: w, height: h }));
    }
    const font = Math.max(w, h) * 0.06;
    card.o.forEach(([label, score, box, mask], k) => {
      const colour = "c" + (k % COLOURS);
      if (mask) {
        const id = "mask-" + card.n + "-" + k;
        const shape = svgNode("mask", { id: id, maskUnits: "userSpaceOnUse", x: 0, y: 0, width: w, height: h });
        shape.appendChild(svgNode("image", { class: "mask", href: mask, x: 0, y: 0, width: w, height: h,
          preserveAspectRatio: "none" }));
        root.appendChild(shape);
        root.appendChild(svgNode("rect", { class: "seg " + colour, x: 0, y: 0, width: w, height: h,
          mask: "url(#" + id + ")" }));
      }
      const [x0, y0, x1, y1] = [box[0] * w, box[1] * h, box[2] * w, box[3] * h];
      root.appendChild(svgNode("rect", { class: "box " + colour, x: x0, y: y0, width: Math.max(0, x1 - x0),
        height: Math.max(0, y1 - y0) }));
      // Above the box where there is room, else just inside its top.
      root.appendChild(svgNode("text", { class: "box-label " + colour, x: x0 + font * 0.2,
        y: y0 > font ? y0 - font * 0.25 : y0 + font, "font-size": font, "stroke-width": font * 0.15 },
        objectName(label, score)));
    });
    return root;
  }
  function objectName(label, score) {
    return score === null ? label : label + " " + score.toFixed(2);
  }
  function objectsNode(card) {
    const list = element("ul", "objects-list");
    const [w, h] = card.s;
    for (const [label, score, box] of card.o) {
      const item = element("li");
      item.appendChild(element("span", "label", label));
      const pixels = [box[0] * w, box[1] * h, box[2] * w, box[3] * h].map((v) => Math.round(v));
      item.appendChild(document.createTextNode(" · score " + number(score, 2) + " · box " + pixels.join(", ")));
      list.appendChild(item);
    }
    return list;
  }
  function number(value, digits) {
    return value === null ? "n/a" : value.toFixed(digits);
  }
  function cardNode(card) {
    const node = element("article", card.s ? "card objects" : "card");
    node.dataset.id = card.id;
    if (card.s) {
      node.appendChild(overlayNode(card));
    } else if (card.t) {
      const image = element("img", "thumb");
      image.alt = "";
      image.src = card.t;
      node.appendChild(image);
    } else {
      node.appendChild(element("div", "thumb placeholder", "no image"));
    }
    const body = element("div", "body");
    body.appendChild(element("h2", "card-id", card.id));
    for (const row of shownRows(card)) {
      const line = element("div", "row");
      if (row[LANG] !== null) line.dataset.lang = row[LANG];
      line.dataset.flags = row[FLAGS].join(" ");
      if (row[QUESTION] !== null) line.appendChild(element("p", "question", row[QUESTION]));
      if (row[LANG] !== null) line.appendChild(element("span", "lang", row[LANG]));
      line.appendChild(element("p", "text", row[TEXT] === null ? "" : row[TEXT]));
      if (row[ERROR] !== null) line.appendChild(element("p", "error", row[ERROR]));
      const facts = element("div", "meta");
      for (const flag of row[FLAGS]) facts.appendChild(element("span", "flag " + flag, flag));
      const parts = [(row[TEXT] === null ? 0 : row[TEXT].length) + " chars"];
      if (card.s) {
        parts.unshift(card.o.length + (card.o.length === 1 ? " object" : " objects"),
          card.pe + (card.pe === 1 ? " parse error" : " parse errors"));
      }
      if (meta.hasConfidence) parts.push("confidence " + number(row[MEAN], 3) + " (min " + number(row[MIN], 3) + ")");
      if (meta.hasSiglip) parts.push(meta.siglipColumn + " " + number(row[SIGLIP], 3));
      facts.appendChild(document.createTextNode(parts.join(" · ")));
      line.appendChild(facts);
      if (card.s && card.o.length) line.appendChild(objectsNode(card));
      body.appendChild(line);
    }
    node.appendChild(body);
    return node;
  }
  function render() {
    const pages = Math.max(1, Math.ceil(view.length / meta.pageSize));
    state.page = Math.min(state.page, pages - 1);
    const start = state.page * meta.pageSize;
    const nodes = view.slice(start, start + meta.pageSize).map(cardNode);
    container.replaceChildren(...nodes);
    info.textContent = "page " + (state.page + 1) + " of " + pages + " · " + view.length + " images";
    prev.disabled = state.page === 0;
    next.disabled = state.page >= pages - 1;
  }
  cards.forEach((card, n) => { card.n = n; });
  for (const button of document.querySelectorAll("button.flag-filter")) {
    button.addEventListener("click", () => {
      state.flag = button.dataset.flag === state.flag ? "" : button.dataset.flag;
      for (const other of document.querySelectorAll("button.flag-filter")) {
        other.setAttribute("aria-pressed", String(other.dataset.flag === state.flag));
      }
      refilter();
    });
  }
  document.getElementById("lang").addEventListener("change", (event) => { state.lang = event.target.value; refilter(); });
  document.getElementById("sort").addEventListener("change", (event) => { state.sort = event.target.value; refilter(); });
  document.getElementById("search").addEventListener("input", (event) => {
    state.query = event.target.value.trim().toLowerCase();
    refilter();
  });
  prev.addEventListener("click", () => { state.page -= 1; render(); window.scrollTo(0, 0); });
  next.addEventListener("click", () => { state.page += 1; render(); window.scrollTo(0, 0); });
  render();
  performance.mark("vlmbatch-cards-shown");  // when the first page is in the DOM (eval/bench_report.py)
})();
