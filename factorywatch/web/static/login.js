// The sign-in page's only script (a file of its own: the CSP allows no inline code).
"use strict";
{
  const error = new URLSearchParams(location.search).get("error");
  if (error) document.getElementById(error === "locked" ? "locked" : "error").hidden = false;
}
