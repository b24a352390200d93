// MathJax 3 settings for pymdownx.arithmatex (generic mode): typeset only what arithmatex
// marked (\( \) inline, \[ \] display, inside .arithmatex), nothing else on the page.
// Loaded before docs/assets/mathjax/tex-chtml-full.js, which finds its fonts beside itself.
// That file and output/chtml/fonts/woff-v2/*.woff are es5/ files of the npm package
// mathjax 3.2.2, unchanged (Apache-2.0: LICENSE beside them); to update, copy the same files
// of a newer 3.x release (`npm pack mathjax@3`) and run docs/check_site.py.
//
// The site ships that one component and its CHTML fonts, no more: the context-menu items
// that would load other components (the SVG renderer; the accessibility explorer and
// collapsing, which need a11y/, input/mml.js and the speech rule engine's maps) are
// disabled, as MathJax itself does where it cannot load components. Screen readers still
// get the hidden MathML (assistive-mml is in the component). docs/check_site.py checks this.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  },
  startup: {
    ready() {
      MathJax.startup.defaultReady();
      MathJax.startup.promise.then(() => {
        const menu = MathJax.startup.document.menu && MathJax.startup.document.menu.menu;
        if (!menu) return;
        for (const ids of [["Settings", "Renderer", "SVG"], ["Accessibility", "Activate"],
                           ["Accessibility", "AutoCollapse"], ["Accessibility", "Collapsible"]]) {
          const item = menu.findID(...ids);
          if (item) item.disable();
        }
      });
    }
  }
};
