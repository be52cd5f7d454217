# Build-time check that the per-ISA objects of cpu_kernels.cpp define no weak (COMDAT) code symbols: the linker
# keeps one copy of such a symbol for the whole module, so a copy compiled with AVX-512 could end up in the
# baseline path and crash older CPUs with SIGILL. Run by CMakeLists.txt after linking _C:
#   cmake -DNM=<nm> -DOBJECTS=<a;b;c> -P check_isa_objects.cmake
foreach(obj IN LISTS OBJECTS)
  execute_process(COMMAND "${NM}" --defined-only "${obj}" OUTPUT_VARIABLE syms RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "check_isa_objects: ${NM} failed on ${obj}")
  endif()
  string(REGEX MATCHALL "[^\n]* [WVu] [^\n]*" weak "${syms}")
  foreach(line IN LISTS weak)
    if(NOT line MATCHES "DW\\.ref\\.__gxx_personality_v0")  # a data pointer to the C++ personality routine
      message(FATAL_ERROR "check_isa_objects: ${obj} defines a weak symbol that another ISA's copy could replace: ${line}")
    endif()
  endforeach()
endforeach()
