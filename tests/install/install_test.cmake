# Install.OutOfTreeProgramsRunAgainstTheInstalledPrefix (tests/CMakeLists.txt): installs the
# build into a fresh prefix, builds examples/cpp outside the tree with find_package(ShardPS)
# (shared and static) and with pkg-config, runs each under the installed `shardps launch`
# (1 server, 2 workers, exact values), then packs the .deb and checks what it holds and needs.
# Every step is bounded in time. Variables: BUILD_DIR, SOURCE_DIR, WORK_DIR.
cmake_minimum_required(VERSION 3.22)
set(prefix "${WORK_DIR}/prefix")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

function(run what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out
    TIMEOUT 240)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (${rc}):\n${out}")
  endif()
  set(OUT "${out}" PARENT_SCOPE)
endfunction()

run("install" ${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${prefix}")
foreach(f include/shardps/worker.h bin/shardps lib/libshardps.a lib/pkgconfig/shardps.pc
          lib/cmake/ShardPS/ShardPSConfig.cmake)
  if(NOT EXISTS "${prefix}/${f}")
    message(FATAL_ERROR "the install has no ${f}")
  endif()
endforeach()
file(GLOB so "${prefix}/lib/libshardps.so.*")
if(NOT so)
  message(FATAL_ERROR "the install has no shared library")
endif()

run("configure the example" ${CMAKE_COMMAND} -S "${SOURCE_DIR}/examples/cpp"
  -B "${WORK_DIR}/example" -G Ninja -DCMAKE_PREFIX_PATH=${prefix})
run("build the example" ${CMAKE_COMMAND} --build "${WORK_DIR}/example")

# With pkg-config, the shared library (found at run time through LD_LIBRARY_PATH).
set(ENV{PKG_CONFIG_PATH} "${prefix}/lib/pkgconfig")
run("pkg-config" pkg-config --cflags --libs shardps)
string(STRIP "${OUT}" flags)
separate_arguments(flags UNIX_COMMAND "${flags}")
run("build with pkg-config" c++ -std=c++20 "${SOURCE_DIR}/examples/cpp/push_pull.cc" ${flags}
  -o "${WORK_DIR}/push_pull_pc")
set(ENV{LD_LIBRARY_PATH} "${prefix}/lib")

foreach(program example/push_pull example/push_pull_static push_pull_pc)
  run("${program} under shardps launch" "${prefix}/bin/shardps" --log-level warn launch
    --servers 1 --workers 2 -- "${WORK_DIR}/${program}")
  string(REGEX MATCHALL "every value exact" exact "${OUT}")
  list(LENGTH exact n)
  if(NOT n EQUAL 2)
    message(FATAL_ERROR "${program}: expected 2 workers with exact values:\n${OUT}")
  endif()
endforeach()

# The .deb: the library, the headers, the command, and the shared libraries it needs.
run("cpack" ${CMAKE_COMMAND} -E chdir "${WORK_DIR}" cpack -G DEB --config
  "${BUILD_DIR}/CPackConfig.cmake" -B "${WORK_DIR}/deb")
file(GLOB deb "${WORK_DIR}/deb/*.deb")
run("dpkg-deb --info" dpkg-deb --info ${deb})
foreach(dep libfmt libspdlog libxxhash)
  if(NOT OUT MATCHES "Depends:[^\n]*${dep}")
    message(FATAL_ERROR "the .deb does not depend on ${dep}:\n${OUT}")
  endif()
endforeach()
run("dpkg-deb --contents" dpkg-deb --contents ${deb})
foreach(f include/shardps/worker.h bin/shardps lib/libshardps.a shardps.pc ShardPSConfig.cmake)
  if(NOT OUT MATCHES "${f}")
    message(FATAL_ERROR "the .deb holds no ${f}:\n${OUT}")
  endif()
endforeach()
message(STATUS "installed, built outside the tree three ways, ran exactly, packed ${deb}")
file(REMOVE_RECURSE "${WORK_DIR}")
