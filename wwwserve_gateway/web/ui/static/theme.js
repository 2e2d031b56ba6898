// Applies the saved theme before the page paints ("auto" follows the system's).
(function () {
  var saved = localStorage.getItem("wwwserve-theme") || "auto";
  document.documentElement.dataset.theme = saved;
})();
