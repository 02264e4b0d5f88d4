// btd dashboard: live numbers by polling, and the two actions (rescore, redeliver) through the JSON API.
// Plain JavaScript, no framework and no CDN: hospital networks are closed.
"use strict";

const POLL_MS = 2000;

// An action is authorised by a token typed into the page (sent as a Bearer header), or else by the login
// session's cookie, which the browser sends by itself; then the session's CSRF token (in a meta tag, never
// in the cookie, which scripts cannot read) must go with it, so that no other site can post for the user.
function tokenHeaders() {
  const field = document.getElementById("api-token");
  if (field && field.value) {
    sessionStorage.setItem("btd-token", field.value);
  }
  const token = (field && field.value) || sessionStorage.getItem("btd-token");
  if (token) return { Authorization: "Bearer " + token };
  const csrf = document.querySelector('meta[name="csrf-token"]');
  return csrf ? { "X-CSRF-Token": csrf.content } : {};
}

async function getJson(url) {
  const response = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
  if (!response.ok) throw new Error(response.status + " " + response.statusText);
  return response.json();
}

// Overview: refresh the counters every few seconds.
function pollOverview(section) {
  const tick = async () => {
    try {
      const data = await getJson(section.dataset.poll);
      section.querySelectorAll("[data-key]").forEach((el) => {
        const value = data[el.dataset.key];
        if (value !== undefined && value !== null) el.textContent = value;
      });
      document.querySelectorAll("[data-state]").forEach((el) => {
        if (el.tagName === "B") el.textContent = (data.states && data.states[el.dataset.state]) || 0;
      });
    } catch (err) {
      /* keep the last numbers; the next tick tries again */
    }
  };
  setInterval(tick, POLL_MS * 2);
}

// Study page: show scoring progress, and reload when the study's state or history changes. A study at
// rest (delivered, failed, rejected) is not polled until an action is taken on it: every poll is a
// database read, and a dashboard left open all day should not keep the database busy.
const RESTING_STATES = new Set(["DELIVERED", "FAILED", "FAILED_DELIVERY", "REJECTED"]);
let studyPoller = null;

function pollStudy(section) {
  if (studyPoller !== null) return;
  const uid = section.dataset.studyUid;
  let known = section.dataset.state;
  let events = null;
  const progress = document.getElementById("progress");
  const tick = async () => {
    let data;
    try {
      data = await getJson("/ui/studies/" + encodeURIComponent(uid) + "/status.json");
    } catch (err) {
      return;
    }
    if (events === null) events = data.n_events;
    if (data.state !== known || data.n_events !== events) {
      window.location.reload();
      return;
    }
    if (data.state === "SCORING" || data.state === "QUEUED") {
      progress.classList.remove("hidden");
      const p = data.progress;
      const done = p ? p.done : data.instances_scored;
      const total = p ? p.total : data.n_instances;
      progress.querySelector(".fill").style.width = (total ? (100 * done) / total : 0).toFixed(1) + "%";
      progress.querySelector(".text").textContent = done + " / " + total + " slices scored";
    }
  };
  studyPoller = setInterval(tick, POLL_MS);
}

async function runAction(button) {
  const result = document.getElementById("action-result");
  button.disabled = true;
  result.textContent = "sending…";
  try {
    const response = await fetch(button.dataset.action, {
      method: "POST",
      credentials: "same-origin",
      headers: Object.assign({ Accept: "application/json" }, tokenHeaders()),
    });
    let body = "";
    try {
      const data = await response.json();
      body = data.detail || data.state || data.dispatched || JSON.stringify(data);
    } catch (err) {
      body = response.statusText;
    }
    result.textContent = (response.ok ? "accepted: " : "refused (" + response.status + "): ") + body;
    result.className = response.ok ? "small" : "small error";
    const study = document.getElementById("study");
    if (response.ok && study) pollStudy(study);
  } catch (err) {
    result.textContent = "failed: " + err.message;
    result.className = "small error";
  } finally {
    button.disabled = false;
  }
}

async function echoDestinations(button) {
  button.disabled = true;
  try {
    const data = await getJson("/ui/destinations/echo.json");
    data.destinations.forEach((d) => {
      const row = document.querySelector('tr[data-destination="' + CSS.escape(d.destination) + '"] .echo');
      if (row) {
        row.textContent = d.ok ? "ok" : d.detail;
        row.className = "echo " + (d.ok ? "" : "error");
      }
    });
  } finally {
    button.disabled = false;
  }
}

function switchWindow(link) {
  const panel = link.closest(".flagged-series");
  panel.querySelectorAll("img.overlay").forEach((img) => {
    const url = new URL(img.src, window.location.href);
    url.searchParams.set("window", link.dataset.window);
    img.src = url.toString();
  });
  panel.querySelectorAll(".window-switch").forEach((a) => a.classList.toggle("active", a === link));
}

document.addEventListener("DOMContentLoaded", () => {
  const today = document.getElementById("today");
  if (today) pollOverview(today);
  const study = document.getElementById("study");
  if (study && !RESTING_STATES.has(study.dataset.state)) pollStudy(study);
  document.querySelectorAll("button[data-action]").forEach((b) => b.addEventListener("click", () => runAction(b)));
  const echo = document.getElementById("echo-button");
  if (echo) echo.addEventListener("click", () => echoDestinations(echo));
  document.querySelectorAll(".window-switch").forEach((a) =>
    a.addEventListener("click", (event) => {
      event.preventDefault();
      switchWindow(a);
    }),
  );
});
